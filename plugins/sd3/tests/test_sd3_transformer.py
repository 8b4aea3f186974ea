"""The SD3 / SD3.5 MMDiT against diffusers: outputs on tiny random weights, keys at full size."""

import attrs
import pytest
import torch

from diffcore.api import CheckpointError, ConfigError, attention_layers, patch_attention, resolve_layers
from diffcore_sd3.convert import (
    detect_layout,
    detect_variant,
    diffusers_to_original,
    infer_params,
    original_to_diffusers,
    to_original,
)
from diffcore_sd3.model import VARIANTS, MMDiT, attention_alias, diffusers_config, params_from_diffusers_config

TOL = 1e-5


def ours_from(ref) -> MMDiT:
    model = MMDiT(params_from_diffusers_config(dict(ref.config))).eval()
    model.load_state_dict(diffusers_to_original(dict(ref.state_dict())), strict=True)
    return model


def run_diffusers(ref, inputs, skip_layers=None):
    return ref(hidden_states=inputs["x"], encoder_hidden_states=inputs["context"], pooled_projections=inputs["y"],
               timestep=1000 * inputs["timesteps"], skip_layers=skip_layers).sample


@pytest.mark.usefixtures("reference_matmuls")
@pytest.mark.parametrize("shape", ["sd3-medium", "sd3.5-large", "sd3.5-medium"])
@torch.no_grad()
def test_parity_with_diffusers(diffusers_sd3, sd3_inputs, shape):
    """Without qk-norm (SD3-medium), with RMS qk-norm (SD3.5-large), with MMDiT-X (SD3.5-medium),
    on a non-square latent so the crop and the un-patchify order are both exercised."""
    ref = diffusers_sd3(shape)
    ours = ours_from(ref)
    inputs = sd3_inputs()
    expected = run_diffusers(ref, inputs)
    got = ours(**inputs)
    assert got.shape == expected.shape == inputs["x"].shape
    assert expected.abs().max() > 1.0  # a real signal, not zeros
    err = (got - expected).abs().max().item()
    assert err <= TOL, f"max abs err {err:.3g}"


@pytest.mark.usefixtures("reference_matmuls")
@pytest.mark.parametrize("skip", [[1], [0, 2]], ids=["middle", "first-and-last"])
@torch.no_grad()
def test_parity_skip_layers(diffusers_sd3, sd3_inputs, skip):
    """Skipped blocks (skip-layer guidance) drop out whole, a dual-attention one and the last too."""
    ref = diffusers_sd3("sd3.5-medium")
    ours = ours_from(ref)
    inputs = sd3_inputs(seed=1)
    expected = run_diffusers(ref, inputs, skip_layers=skip)
    got = ours(**inputs, skip_layers=skip)
    err = (got - expected).abs().max().item()
    assert err <= TOL, f"max abs err {err:.3g}"
    assert (got - ours(**inputs)).abs().max() > 1e-2  # skipping changed something


def test_pos_embed_init_matches_diffusers(diffusers_sd3):
    """A fresh model's positional table is diffusers' (the sin-cos grid scaled to sample_size / patch)."""
    from diffusers import SD3Transformer2DModel

    ref = SD3Transformer2DModel.from_config(diffusers_sd3("sd3-medium").config)
    ours = MMDiT(params_from_diffusers_config(dict(ref.config)))
    assert torch.allclose(ours.pos_embed, ref.pos_embed.pos_embed, atol=1e-6)


@torch.no_grad()
def test_crop_is_centred():
    """The crop of an h x w latent grid is the centre of the stored max x max table."""
    model = MMDiT(VARIANTS["tiny"])
    size = model.params.pos_embed_max_size
    model.pos_embed.copy_(torch.arange(size * size, dtype=torch.float32)[None, :, None].expand_as(model.pos_embed))
    crop = model.cropped_pos_embed(3, 4)[0, :, 0].reshape(3, 4)
    top, left = (size - 3) // 2, (size - 4) // 2
    assert crop[0, 0] == top * size + left and crop[2, 3] == (top + 2) * size + left + 3


def test_bad_inputs_are_named():
    model = MMDiT(VARIANTS["tiny"])
    ctx, y, t = torch.zeros(1, 3, 48), torch.zeros(1, 40), torch.zeros(1)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(torch.zeros(1, 16, 5, 6), t, ctx, y)
    with pytest.raises(ValueError, match="larger than the positional table"):
        model(torch.zeros(1, 16, 34, 6), t, ctx, y)
    with pytest.raises(ValueError, match="expected latents"):
        model(torch.zeros(1, 64, 4, 4), t, ctx, y)
    with pytest.raises(ValueError, match="skip_layers"):
        model(torch.zeros(1, 16, 4, 4), t, ctx, y, skip_layers=[3])
    with pytest.raises(ValueError, match="must be blocks 0..1"):
        MMDiT(attrs.evolve(VARIANTS["tiny"], dual_attention_layers=(2,)))


def test_roundtrip_is_exact(diffusers_sd3):
    """diffusers -> original -> diffusers gives back every tensor bit for bit (the swaps undo)."""
    ref = diffusers_sd3("sd3.5-medium")
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    back = original_to_diffusers(diffusers_to_original(dict(sd)))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("name, original, diffusers, dual, table", [
    ("sd3-medium", 491, 683, (), 192),
    ("sd3.5-large", 923, 1227, (), 192),
    ("sd3.5-large-turbo", 923, 1227, (), 192),
    ("sd3.5-medium", 665, 909, tuple(range(13)), 384),
])
def test_full_size_keys_match_diffusers(name, original, diffusers, dual, table):
    """Every released variant on the meta device: our keys are the original layout's count, and
    after conversion the exact key set and shapes of diffusers' model with the release config."""
    from diffusers import SD3Transformer2DModel

    params = VARIANTS[name]
    assert params.dual_attention_layers == dual and params.pos_embed_max_size == table
    with torch.device("meta"):
        ours = MMDiT(params)
        ref = SD3Transformer2DModel(**{k: v for k, v in diffusers_config(params).items() if k != "_class_name"})
    sd = ours.state_dict()
    assert len(sd) == original
    converted = original_to_diffusers({k: v for k, v in sd.items()})
    ref_sd = ref.state_dict()
    assert len(ref_sd) == diffusers
    assert converted.keys() == ref_sd.keys()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}
    assert params_from_diffusers_config(dict(ref.config)) == params
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert infer_params(shapes, num_heads=params.num_heads) == params
    assert detect_variant(shapes) == ("sd3.5-large" if name.startswith("sd3.5-large") else name)


def test_variant_facts():
    """The numbers the seeds got wrong, pinned: 16 input channels (not 64), large is 2432 wide
    and 38 deep, MMDiT-X only in SD3.5-medium's first 13 blocks, qk-norm only in SD3.5."""
    for name, p in VARIANTS.items():
        assert p.in_channels == 16 and p.out_channels == 16 and p.patch_size == 2, name
    for name in ("sd3-medium", "sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium"):
        p = VARIANTS[name]
        assert p.head_dim == 64 and p.num_heads == p.depth and p.hidden_size == 64 * p.depth, name
        assert (p.context_in_dim, p.pooled_dim) == (4096, 2048)
    assert (VARIANTS["sd3.5-large"].hidden_size, VARIANTS["sd3.5-large"].depth) == (2432, 38)
    assert VARIANTS["sd3.5-large-turbo"] == VARIANTS["sd3.5-large"]
    assert (VARIANTS["sd3-medium"].hidden_size, VARIANTS["sd3-medium"].depth) == (1536, 24)
    assert VARIANTS["sd3.5-medium"].dual_attention_layers == tuple(range(13))
    assert not VARIANTS["sd3-medium"].qk_norm and all(VARIANTS[n].qk_norm for n in VARIANTS if n.startswith("sd3.5"))
    with torch.device("meta"):
        assert MMDiT(VARIANTS["sd3.5-large"]).x_embedder.proj.weight.shape == (2432, 16, 2, 2)


def test_layout_detection_and_foreign_files(diffusers_sd3):
    sd = dict(diffusers_sd3("sd3-medium").state_dict())
    assert detect_layout(sd) == "diffusers"
    original = diffusers_to_original(dict(sd))
    assert detect_layout(original) == "original"
    single = {f"model.diffusion_model.{k}": v for k, v in original.items()} | {"first_stage_model.x": torch.zeros(1)}
    assert detect_layout(single) == "single-file"
    assert to_original(dict(single)).keys() == original.keys()
    for keys, what in ((["double_blocks.0.img_attn.qkv.weight", "img_in.weight"], "flux1"),
                       (["single_transformer_blocks.0.attn.to_q.weight", "x_embedder.weight"], "FLUX"),
                       (["input_blocks.0.0.weight", "label_emb.0.0.weight"], "SDXL"),
                       (["model.diffusion_model.label_emb.0.0.weight"], "SDXL")):
        with pytest.raises(CheckpointError, match=what):
            detect_layout(dict.fromkeys(keys))


def test_attention_layers_and_aliases():
    """The joint attention of block N is ``joint_blocks.N`` (diffusers: ``transformer_blocks.N.attn``),
    MMDiT-X's second one ``joint_blocks.N.x_block.attn2``; unknown names list what exists."""
    model = MMDiT(VARIANTS["tiny"])
    layers = attention_layers(model)
    assert set(layers) == {"joint_blocks.0", "joint_blocks.1", "joint_blocks.2",
                           "joint_blocks.0.x_block.attn2", "joint_blocks.1.x_block.attn2"}
    found = resolve_layers(model, ["transformer_blocks.1.attn", "transformer_blocks.0.attn2", "transformer_blocks.2"],
                           attention_alias)
    assert found["transformer_blocks.1.attn"] is layers["joint_blocks.1"]
    assert found["transformer_blocks.0.attn2"] is layers["joint_blocks.0.x_block.attn2"]
    assert found["transformer_blocks.2"] is layers["joint_blocks.2"]
    with pytest.raises(ConfigError, match="joint_blocks"):
        resolve_layers(model, ["transformer_blocks.7.attn"], attention_alias)


@torch.no_grad()
def test_attention_patch_applies_to_its_rows(sd3_inputs):
    """A patch on the joint attention (PAG's identity) changes only the rows it is entered for."""
    torch.manual_seed(0)
    model = MMDiT(VARIANTS["tiny"]).eval()
    inputs = sd3_inputs(batch=2)
    plain = model(**inputs)
    layers = resolve_layers(model, ["transformer_blocks.1.attn"], attention_alias)
    with patch_attention(layers, slice(1, 2), lambda q, k, v, attend: v):
        patched = model(**inputs)
    assert torch.equal(patched[0], plain[0])
    assert (patched[1] - plain[1]).abs().max() > 1e-3
