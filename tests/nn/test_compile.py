"""``compile_network``: the families' tiny networks compiled (inductor, CPU) equal eager, trace as
one graph each (no graph breaks), keep their state-dict keys, recompile at most once over
several sizes, and run eagerly while guidance patches attention."""

from __future__ import annotations

import attrs
import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

from diffcore.nn.attention import attention_layers, patch_attention
from diffcore.nn.compile import compile_network, is_compiled, uncompiled

TOL = 1e-5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own compiles."""
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()


def compiles() -> int:
    """Graphs dynamo has compiled since the test began (one per compile of one frame)."""
    return counters["stats"]["unique_graphs"]


def dit():
    pytest.importorskip("diffcore_dit")
    from diffcore_dit.model import DiT2D
    from diffcore_dit.params import DiTParams

    torch.manual_seed(0)
    model = DiT2D(DiTParams(hidden=32, depth=2, heads=4, patch=2, in_channels=3, image_size=8, num_classes=5)).eval()
    with torch.no_grad():   # the zero init would make the output zero
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def flux1():
    pytest.importorskip("diffcore_flux1")
    from diffcore_flux1.model import VARIANTS, Flux

    torch.manual_seed(0)   # one block of each kind: the compile time grows with the depth
    return Flux(attrs.evolve(VARIANTS["tiny"], depth=1, depth_single_blocks=1)).eval()


def flux1_inputs(h: int, w: int, batch: int = 2, txt: int = 7, seed: int = 0) -> dict:
    from diffcore_flux1.sampling import prepare_img_ids, prepare_txt_ids

    g = torch.Generator().manual_seed(seed)
    return dict(img=torch.randn(batch, h * w, 64, generator=g), img_ids=prepare_img_ids(h, w)[0],
                txt=torch.randn(batch, txt, 48, generator=g), txt_ids=prepare_txt_ids(txt)[0],
                y=torch.randn(batch, 32, generator=g), timesteps=torch.rand(batch, generator=g),
                guidance=torch.full((batch,), 3.5))


def close(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got - expected).abs().max().item()


@torch.no_grad()
def test_dit_compiled_equals_eager_in_one_graph_with_the_same_keys():
    model = dit()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 4])
    sigmas = [torch.full((2,), s) for s in (0.9, 0.5, 0.2)]
    expected = [model(x, sigma, y) for sigma in sigmas]
    keys = list(model.state_dict())
    compile_network(model, fullgraph=True)   # a graph break would raise
    assert is_compiled(model) and list(model.state_dict()) == keys
    for sigma, want in zip(sigmas, expected):   # a sampling loop: new values, same shapes, no recompile
        assert close(model(x, sigma, y), want) <= TOL and want.abs().max() > 0.1
    assert compiles() == 1
    assert compile_network(model) is model and compiles() == 1   # twice: a no-op
    uncompiled(model)
    assert not is_compiled(model) and "forward" not in model.__dict__
    assert torch.equal(model(x, sigmas[0], y), expected[0])


@torch.no_grad()
def test_flux1_compiled_equals_eager():
    model = flux1()
    inputs = flux1_inputs(4, 5)
    expected = model(**inputs)
    compile_network(model, fullgraph=True)
    assert (model(**inputs) - expected).abs().max().item() <= TOL
    assert compiles() == 1


@torch.no_grad()
def test_flux1_recompiles_once_over_three_sizes():
    """Three token grids, two steps each: the second size recompiles with dynamic sizes, the third
    reuses that graph (dynamic=None, PyTorch's automatic dynamic shapes). Traced only: the count
    is dynamo's, whatever the backend."""
    model = compile_network(flux1(), fullgraph=True, backend="eager")
    for size in [(4, 5), (6, 4), (3, 7)]:
        for seed in range(2):
            model(**flux1_inputs(*size, seed=seed))
    assert compiles() == 2


@torch.no_grad()
def test_patched_attention_runs_eagerly_without_recompiling():
    """PAG-like patches (a new callable each step) take the eager forward; unpatched steps the graph."""
    model = dit()
    x, sigma, y = torch.randn(2, 3, 8, 8), torch.tensor([0.9, 0.2]), torch.tensor([1, 4])
    layers = attention_layers(model)
    with patch_attention(layers, slice(1, 2), lambda q, k, v, attend: v):
        expected_patched = model(x, sigma, y)
    expected = model(x, sigma, y)
    compile_network(model, fullgraph=True)
    for step in range(3):
        assert close(model(x, sigma, y), expected) <= TOL
        with patch_attention(layers, slice(1, 2), lambda q, k, v, attend, step=step: v):
            assert torch.equal(model(x, sigma, y), expected_patched)
    assert compiles() == 1


def assert_one_graph(model: torch.nn.Module, *args, **kwargs) -> None:
    """Traced only (no inductor): the forward is one graph, with no break."""
    with torch.no_grad():
        explained = dynamo.explain(model)(*args, **kwargs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@torch.no_grad()
@pytest.mark.parametrize("family", ["flux2", "sd3", "sdxl"])
def test_recompiles_once_over_four_sizes(family, tiny_case):
    """Every family as FLUX.1 above: the second size compiles a graph with dynamic sizes, which
    the third and fourth (two steps each) reuse. FLUX.2's last single block keeps only the image
    tokens, a slice of symbolic sizes: that once cost a compile per resolution."""
    options = {"single_blocks": 1} if family == "flux2" else {}
    model = compile_network(tiny_case(family, **options)[0], fullgraph=True, backend="eager")
    for size in [(4, 5), (6, 4), (3, 7), (8, 8)]:
        _, args, kw = tiny_case(family, size=size, **options)
        for _ in range(2):
            model(*args, **kw)
    assert compiles() == 2


@pytest.mark.parametrize("family", ["flux2", "sd3", "sdxl"])
def test_families_have_no_graph_breaks(family, tiny_case):
    model, args, kw = tiny_case(family, **({"single_blocks": 1} if family == "flux2" else {}))
    assert_one_graph(model, *args, **kw)
