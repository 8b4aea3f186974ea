"""``diffcore.nn.lora_linear``: LoRA layers run as one function (``fuse_lora_layers``) and a
LoRA on a layer fed by an activation (``activated_linear``) give peft's outputs and gradients to
rounding while keeping less for the backward pass; anything they do not compute as peft does
(dropout, a merged adapter, no gradients, autocast) runs peft itself."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from diffcore.nn.linear import GeluMLP
from diffcore.nn.lora_linear import fuse_lora_layers
from diffcore.nn.mmdit import SingleStreamBlock, SwiGLUMLP

peft = pytest.importorskip("peft")

TOL = 1e-6


def with_lora(module: nn.Module, targets: list[str], dropout: float = 0.0) -> nn.Module:
    """``module`` with rank-4 adapters (random A and B, so both matter) and frozen base weights."""
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets,
                             init_lora_weights=False)
    torch.manual_seed(1)
    module = peft.inject_adapter_in_model(config, module)
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
    fuse_lora_layers(module)
    return module


def as_peft_runs_it(module: nn.Module) -> nn.Module:
    """A copy whose adapters all take peft's own path: a zero-rate dropout module is the same
    function, but not one ``activated_linear`` computes itself."""
    module = copy.deepcopy(module)
    for layer in module.modules():
        layer.__dict__.pop("forward", None)   # fuse_lora_layers' forwards
        if hasattr(layer, "lora_dropout"):
            for name in layer.lora_dropout:
                layer.lora_dropout[name] = nn.Dropout(0.0)
    return module


def saved_bytes(run, module: nn.Module | None = None) -> int:
    """Bytes autograd keeps for the backward pass of ``run()``, each storage counted once and the
    module's own weights left out (keeping a reference to a weight costs no memory)."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()} if module is not None else set()
    storages: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(storages.values())


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return with_lora(GeluMLP(16, 64), ["0", "2"])


def swiglu_mlp() -> nn.Module:
    torch.manual_seed(0)
    return with_lora(SwiGLUMLP(16, 32), ["0", "2"])


def sdxl_feed_forward() -> nn.Module:
    layers = pytest.importorskip("diffcore_sdxl.layers")
    torch.manual_seed(0)
    return with_lora(layers.FeedForward(16), ["proj", "net.2"])


def block() -> nn.Module:
    torch.manual_seed(0)
    return with_lora(SingleStreamBlock(32, 4, 128), ["linear1", "linear2", "modulation.lin"])


def block_inputs():
    torch.manual_seed(2)
    x = torch.randn(2, 10, 32, requires_grad=True)
    pe = torch.polar(torch.ones(1, 1, 10, 4), torch.randn(1, 1, 10, 4))   # complex rotations
    return (x, pe, torch.randn(2, 32))


def mlp_inputs():
    torch.manual_seed(2)
    return (torch.randn(2, 10, 16, requires_grad=True),)


CASES = [(mlp, mlp_inputs), (swiglu_mlp, mlp_inputs), (sdxl_feed_forward, mlp_inputs), (block, block_inputs)]
IDS = ["gelu-mlp", "swiglu-mlp", "sdxl-geglu", "single-block"]


def grads(module: nn.Module, inputs) -> list[torch.Tensor]:
    out = module(*inputs)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    found = [p.grad for p in module.parameters() if p.requires_grad] + [inputs[0].grad]
    for p in module.parameters():
        p.grad = None
    inputs[0].grad = None
    return out, found


def on_fp8_base(make):
    """``make``'s module with every base layer stored in fp8 (a train job's ``weight_dtype``): peft
    over ``Float8Linear`` bases computes through their own autograd function."""
    from diffcore.nn.fp8 import store_fp8

    def build() -> nn.Module:
        module = make()
        assert store_fp8(module, min_features=1)
        return module
    return build


FP8_CASES = [(on_fp8_base(make), inputs) for make, inputs in CASES]
BOTH, BOTH_IDS = CASES + FP8_CASES, IDS + [f"{name}-fp8-base" for name in IDS]


@pytest.mark.parametrize("make, inputs", BOTH, ids=BOTH_IDS)
def test_outputs_equal_peft_and_gradients_agree(make, inputs):
    ours = make()
    theirs = as_peft_runs_it(ours)
    args = inputs()
    out, ours_grads = grads(ours, args)
    ref, ref_grads = grads(theirs, args)
    assert torch.equal(out, ref)
    assert len(ours_grads) == len(ref_grads) > 2
    for g, r in zip(ours_grads, ref_grads):
        assert (g - r).abs().max() <= TOL * max(1.0, r.abs().max())


@pytest.mark.parametrize("make, inputs", FP8_CASES, ids=IDS)
def test_an_fp8_base_keeps_no_dequantised_weight(make, inputs):
    from diffcore.nn.fp8 import Float8Linear

    ours, args = make(), inputs()
    shapes = {(m.out_features, m.in_features) for m in ours.modules() if isinstance(m, Float8Linear)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours(*args)
    assert not [t for t in saved if tuple(t.shape) in shapes and t.dtype.is_floating_point and t.itemsize > 1]


@pytest.mark.parametrize("make, inputs", BOTH, ids=BOTH_IDS)
def test_less_is_kept_for_backward(make, inputs):
    ours = make()
    theirs = as_peft_runs_it(ours)
    args = inputs()
    _, kept = saved_bytes(lambda: ours(*args), ours)
    _, kept_by_peft = saved_bytes(lambda: theirs(*args), theirs)
    assert kept < kept_by_peft


def test_dropout_a_merged_adapter_and_no_grad_run_peft_itself():
    args = mlp_inputs()
    with_dropout = with_lora(GeluMLP(16, 64), ["0", "2"], dropout=0.5)
    torch.manual_seed(3)
    out = with_dropout(*args)
    torch.manual_seed(3)
    assert torch.equal(out, nn.Sequential.forward(with_dropout, *args))

    merged = mlp()
    with torch.no_grad():
        expected = as_peft_runs_it(merged)(*args)
        assert torch.equal(merged(*args), expected)
    merged[2].merge()
    assert torch.allclose(merged(*args), expected, atol=1e-5)


def test_it_works_under_gradient_checkpointing():
    ours = mlp()
    theirs = as_peft_runs_it(ours)
    (x,) = mlp_inputs()
    from torch.utils.checkpoint import checkpoint

    out = checkpoint(ours, x, use_reentrant=False)
    out.sum().backward()
    got = [p.grad.clone() for p in ours.parameters() if p.requires_grad]
    theirs(x).sum().backward()
    want = [p.grad for p in theirs.parameters() if p.requires_grad]
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= TOL * max(1.0, w.abs().max())


def test_a_checkpointed_block_keeps_nothing_extra_and_recomputes_once():
    from diffcore.nn.checkpointing import run_block

    ours = mlp()
    theirs = as_peft_runs_it(ours)
    (x,) = mlp_inputs()
    out, kept = saved_bytes(lambda: run_block(ours, x, checkpointing=True))
    out.sum().backward()
    got = [p.grad.clone() for p in ours.parameters() if p.requires_grad]
    theirs(x).sum().backward()
    want = [p.grad for p in theirs.parameters() if p.requires_grad]
    for g, w in zip(got, want):
        assert torch.equal(g, w)   # the plain composition inside a checkpoint: peft's own arithmetic
    assert kept <= x.untyped_storage().nbytes()


def test_under_autocast_it_runs_peft_itself():
    ours = mlp()
    theirs = as_peft_runs_it(ours)
    (x,) = mlp_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = ours(x), theirs(x)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(out, ref)
    out.float().sum().backward()


def test_a_deep_copy_of_a_fused_module_computes_with_its_own_weights():
    ours = mlp()
    twin = copy.deepcopy(ours)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(2)
    (x,) = mlp_inputs()
    out, twin_out = ours(x), twin(x)
    assert not torch.allclose(out, twin_out)
    assert torch.allclose(twin_out, as_peft_runs_it(twin)(x), atol=1e-6)


def test_a_lone_lora_linear_on_two_dimensional_input_matches_peft():
    torch.manual_seed(0)
    ours = with_lora(nn.Sequential(nn.Linear(12, 20)), ["0"])
    theirs = as_peft_runs_it(ours)
    x = torch.randn(7, 12, requires_grad=True)
    out, got = grads(ours, (x,))
    ref, want = grads(theirs, (x,))
    assert torch.allclose(out, ref, atol=1e-6)
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= TOL * max(1.0, w.abs().max())


@settings(max_examples=25, deadline=None, derandomize=True)
@given(dims=st.tuples(st.integers(1, 24), st.integers(1, 24)), rank=st.integers(1, 6), alpha=st.sampled_from([1, 3, 16]),
       lead=st.lists(st.integers(1, 5), min_size=0, max_size=2), bias=st.booleans(),
       input_grad=st.booleans())
def test_any_shape_rank_and_scaling_matches_peft(dims, rank, alpha, lead, bias, input_grad):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], init_lora_weights=False)
    ours = peft.inject_adapter_in_model(config, nn.Sequential(nn.Linear(*dims, bias=bias)))
    for name, p in ours.named_parameters():
        p.requires_grad_("lora_" in name)
    fuse_lora_layers(ours)
    theirs = as_peft_runs_it(ours)
    x = torch.randn(*lead, dims[0], requires_grad=input_grad)
    out, ref = ours(x), theirs(x)
    assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-6 * max(1.0, ref.abs().max())
    weight = torch.randn(ref.shape)
    got = torch.autograd.grad((out * weight).sum(), [p for p in ours.parameters() if p.requires_grad] + ([x] if input_grad else []))
    want = torch.autograd.grad((ref * weight).sum(), [p for p in theirs.parameters() if p.requires_grad] + ([x] if input_grad else []))
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 1e-5 * max(1.0, w.abs().max())
