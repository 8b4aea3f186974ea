"""DiT2D against diffusers' DiTTransformer2DModel: same weights (converted), same outputs."""

import attrs
import pytest
import torch

from diffcore.api import CheckpointError
from diffcore_dit.convert import diffusers_config, from_diffusers, params_from_diffusers
from diffcore_dit.model import DiT2D
from diffcore_dit.params import VARIANTS, DiTParams

diffusers = pytest.importorskip("diffusers")

PARAMS = DiTParams(hidden=64, depth=3, heads=4, patch=2, in_channels=3, image_size=16, num_classes=7)


def reference(params: DiTParams, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random diffusers DiT whose per-block embedders are copies of block 0's, as in real checkpoints."""
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(**{**diffusers_config(params), **overrides}).eval()
    sd = model.state_dict()
    for key in sd:
        if ".norm1.emb." in key:
            sd[key] = sd["transformer_blocks.0." + key.split(".", 2)[2]]
    model.load_state_dict(sd)
    return model


def inputs(params: DiTParams, batch: int = 4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, params.in_channels, params.image_size, params.image_size, generator=g)
    sigma = torch.rand(batch, generator=g)
    y = torch.randint(0, params.num_classes + 1, (batch,), generator=g)  # includes the null class
    y[-1] = params.num_classes
    return x, sigma, y


def run_both(ref: torch.nn.Module, params: DiTParams):
    ours = DiT2D(params_from_diffusers(ref.config)).eval()
    ours.load_state_dict(from_diffusers(ref.state_dict()))
    x, sigma, y = inputs(params)
    with torch.no_grad():
        expected = ref(x, timestep=sigma * 1000, class_labels=y).sample
        got = ours(x, sigma, y)
    return expected, got


def test_outputs_match_diffusers_fp32():
    expected, got = run_both(reference(PARAMS), PARAMS)
    assert expected.abs().max() > 0.5  # a random model, not the zero init
    assert (expected - got).abs().max().item() <= 1e-5


def test_stock_diffusers_eps_differs_only_in_mlp_norm_eps():
    # diffusers' DiT uses norm_eps=1e-5 in the MLP LayerNorm where DiT uses 1e-6
    expected, got = run_both(reference(PARAMS, norm_eps=1e-5), PARAMS)
    assert (expected - got).abs().max().item() <= 1e-4


def test_learned_sigma_output_keeps_the_first_half_of_channels():
    ref = reference(PARAMS, out_channels=2 * PARAMS.in_channels)
    expected, got = run_both(ref, PARAMS)
    assert expected.shape[1] == 2 * got.shape[1]
    assert (expected[:, :PARAMS.in_channels] - got).abs().max().item() <= 1e-5


def test_per_block_embedders_that_differ_are_refused():
    torch.manual_seed(0)
    sd = diffusers.DiTTransformer2DModel(**diffusers_config(PARAMS)).state_dict()
    with pytest.raises(CheckpointError, match="block 1 has its own"):
        from_diffusers(sd)


def test_unknown_keys_are_refused():
    sd = reference(PARAMS).state_dict()
    sd["transformer_blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="transformer_blocks.0.extra.weight"):
        from_diffusers(sd)


@pytest.mark.parametrize("variant, paper_params", [("S-2", 33.0e6), ("B-2", 130.5e6)])
def test_full_size_variants_on_meta(variant, paper_params):
    params = VARIANTS[variant]
    with torch.device("meta"):
        ours = DiT2D(params)
        ref = diffusers.DiTTransformer2DModel(**diffusers_config(params))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # diffusers repeats the timestep+class embedder in every block; DiT shares one
    per_block_embedder = count(ref.transformer_blocks[0].norm1.emb)
    assert count(ref) - (params.depth - 1) * per_block_embedder == count(ours)
    # DiT paper (table 4) at its own geometry: 32x32x4 latents, 1000 classes
    with torch.device("meta"):
        paper = DiT2D(attrs.evolve(params, in_channels=4, image_size=32))
    assert abs(count(paper) - paper_params) / paper_params < 0.01

    converted = from_diffusers(ref.state_dict())
    own = ours.state_dict()
    assert sorted(converted) == sorted(own)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in own.items()}
