"""The FLUX.1 transformer against diffusers: outputs on tiny random weights, keys at full size."""

import attrs
import pytest
import torch

from diffcore.api import attention_layers, CheckpointError, ConfigError, patch_attention, resolve_layers
from diffcore_flux1.convert import (
    bfl_to_diffusers,
    detect_layout,
    detect_variant,
    diffusers_to_bfl,
    infer_params,
    to_bfl,
)
from diffcore_flux1.model import VARIANTS, Flux, attention_alias, diffusers_config, params_from_diffusers_config
from diffcore_flux1.params import DEFAULTS
from diffcore_flux1.sampling import prepare_kontext_ids

TOL = 1e-5


def ours_from(ref, **overrides) -> Flux:
    model = Flux(attrs.evolve(VARIANTS["tiny"], **overrides)).eval()
    model.load_state_dict(diffusers_to_bfl(dict(ref.state_dict())), strict=True)
    return model


def run_diffusers(ref, inputs, guidance=True):
    return ref(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"], pooled_projections=inputs["y"],
               timestep=inputs["timesteps"], img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"],
               guidance=inputs["guidance"] if guidance else None).sample


@pytest.mark.usefixtures("reference_matmuls")
@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
@torch.no_grad()
def test_parity_with_diffusers(diffusers_flux, flux_inputs, guidance):
    ref = diffusers_flux(guidance=guidance)
    ours = ours_from(ref, guidance_embed=guidance)
    inputs = flux_inputs()
    expected = run_diffusers(ref, inputs, guidance)
    got = ours(**{k: v for k, v in inputs.items() if guidance or k != "guidance"})
    err = (got - expected).abs().max().item()
    assert expected.abs().max() > 1.0  # a real signal, not zeros
    assert err <= TOL, f"max abs err {err:.3g}"


@pytest.mark.usefixtures("reference_matmuls")
@torch.no_grad()
def test_parity_kontext_reference_tokens(diffusers_flux, flux_inputs):
    """A Kontext step as FluxKontextPipeline runs it: the reference's tokens (its own 3 x 6 grid,
    t = 1) appended after the target's 4 x 5, the output sliced back to the target."""
    ref = diffusers_flux(guidance=True)
    ours = ours_from(ref)
    inputs = flux_inputs()
    reference = torch.randn(2, 18, 64, generator=torch.Generator().manual_seed(1))
    ids = torch.cat([inputs["img_ids"], prepare_kontext_ids(3, 6)[0]], dim=0)
    joint = {**inputs, "img": torch.cat([inputs["img"], reference], dim=1), "img_ids": ids}
    expected = run_diffusers(ref, joint)[:, :20]
    got = ours(**joint)[:, :20]
    err = (got - expected).abs().max().item()
    assert err <= TOL, f"max abs err {err:.3g}"
    assert (got - ours(**inputs)).abs().max() > 1e-2  # the reference tokens matter
    batched = {**joint, "img_ids": ids[None].expand(2, -1, -1), "txt_ids": inputs["txt_ids"][None]}
    assert torch.equal(ours(**batched)[:, :20], got)  # BFL's (batch, tokens, 3) ids give the same


@pytest.mark.usefixtures("reference_matmuls")
@torch.no_grad()
def test_parity_fill_input(diffusers_flux, flux_inputs):
    """Fill-dev's img_in takes [noisy 64 | masked-image latents 64 | mask 256] = 384 channels."""
    ref = diffusers_flux(guidance=True, in_channels=384, out_channels=64)
    ours = ours_from(ref, in_channels=384)
    inputs = flux_inputs(in_channels=384)
    expected = run_diffusers(ref, inputs)
    got = ours(**inputs)
    err = (got - expected).abs().max().item()
    assert got.shape == (2, 20, 64) and expected.abs().max() > 1.0
    assert err <= TOL, f"max abs err {err:.3g}"


def test_conversion_round_trip_and_detection(diffusers_flux):
    sd = diffusers_flux().state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert detect_layout(sd) == "diffusers" and detect_variant(shapes) == "tiny"
    bfl = diffusers_to_bfl(dict(sd))
    assert detect_layout(bfl) == "bfl"
    assert bfl["final_layer.adaLN_modulation.1.weight"][:64].equal(sd["norm_out.linear.weight"][64:])  # (shift, scale)
    back = bfl_to_diffusers(dict(bfl))
    assert back.keys() == sd.keys() and all(back[k].equal(sd[k]) for k in sd)
    comfy = {f"model.diffusion_model.{k}": v for k, v in bfl.items()}
    comfy["first_stage_model.conv_in.weight"] = torch.zeros(1)  # an all-in-one file's VAE
    assert detect_layout(comfy) == "comfyui"
    assert to_bfl(dict(comfy)).keys() == bfl.keys()
    assert infer_params(shapes, axes_dim=(8, 12, 12)) == VARIANTS["tiny"]
    with pytest.raises(CheckpointError, match="head dim 32 is not FLUX.1's 128"):
        infer_params(shapes)
    with pytest.raises(CheckpointError, match="not a FLUX.1 transformer checkpoint"):
        detect_layout(["unet.conv_in.weight"])


def test_converter_passes_unknown_keys_through(diffusers_flux):
    sd = dict(diffusers_flux().state_dict())
    sd["lora_A.weight"] = torch.zeros(1)
    del sd["transformer_blocks.1.attn.to_k.weight"]
    out = diffusers_to_bfl(sd)
    assert "lora_A.weight" in out
    assert "transformer_blocks.1.attn.to_q.weight" in out  # an incomplete fused group is not fused
    assert "double_blocks.1.img_attn.qkv.weight" not in out


@pytest.mark.parametrize("variant, kwargs, bfl_keys", [
    ("dev", dict(guidance_embeds=True), 780),
    ("schnell", dict(), 776),
    ("kontext-dev", dict(guidance_embeds=True), 780),
    ("fill-dev", dict(guidance_embeds=True, in_channels=384, out_channels=64), 780),
    ("canny-dev", dict(guidance_embeds=True, in_channels=128, out_channels=64), 780),
])
def test_full_size_keys_match_diffusers(variant, kwargs, bfl_keys):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        ref = FluxTransformer2DModel(**kwargs)
        ours = Flux(VARIANTS[variant])
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    bfl = ours.state_dict()
    assert len(bfl) == bfl_keys
    assert {k: tuple(v.shape) for k, v in bfl_to_diffusers(dict(bfl)).items()} == expected
    detected = "dev" if variant == "kontext-dev" else variant  # Kontext has dev's shapes: only its name tells
    assert detect_variant(expected) == detected
    assert detect_variant({k: tuple(v.shape) for k, v in bfl.items()}) == detected
    config = diffusers_config(VARIANTS[variant])
    assert params_from_diffusers_config(config) == VARIANTS[variant]
    with torch.device("meta"):  # the config.json the convert job writes builds the same model in diffusers
        rebuilt = FluxTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == expected


def test_variant_table():
    dev = VARIANTS["dev"]
    assert (dev.hidden_size, dev.num_heads, dev.depth, dev.depth_single_blocks) == (3072, 24, 19, 38)
    assert dev.axes_dim == (16, 56, 56) and dev.theta == 10_000 and dev.context_in_dim == 4096 and dev.vec_in_dim == 768
    assert not VARIANTS["schnell"].guidance_embed and VARIANTS["kontext-dev"] == dev
    assert VARIANTS["fill-dev"].in_channels == 384 and VARIANTS["canny-dev"].in_channels == 128
    assert VARIANTS["depth-dev"].in_channels == 128 and VARIANTS["fill-dev"].out_channels == 64
    assert DEFAULTS.keys() == VARIANTS.keys()
    assert [(DEFAULTS[v].steps, DEFAULTS[v].guidance) for v in ("dev", "kontext-dev", "fill-dev")] == \
        [(28, 3.5), (28, 2.5), (50, 30.0)]
    assert (DEFAULTS["schnell"].steps, DEFAULTS["schnell"].shift, DEFAULTS["schnell"].max_sequence_length) == \
        (4, False, 256)
    with pytest.raises(ValueError, match=r"rope axes \(8, 12, 10\) must be even and sum to the head dim 32"):
        Flux(attrs.evolve(VARIANTS["tiny"], axes_dim=(8, 12, 10)))
    with pytest.raises(ValueError, match="hidden_size 64 is not divisible by num_heads 3"):
        Flux(attrs.evolve(VARIANTS["tiny"], num_heads=3))


def test_guidance_is_required_by_distilled_variants(flux_inputs):
    inputs = flux_inputs()
    inputs.pop("guidance")
    with pytest.raises(ValueError, match="guidance-distilled"):
        Flux(VARIANTS["tiny"])(**inputs)
    with pytest.raises(ValueError, match=r"position ids \(1, 19, 3\) do not match 20 tokens in a batch of 2"):
        Flux(attrs.evolve(VARIANTS["tiny"], guidance_embed=False))(**{**inputs, "img_ids": inputs["img_ids"][:19]})


def test_attention_layer_names_and_aliases(flux_inputs):
    model = Flux(VARIANTS["tiny"]).eval()
    assert list(attention_layers(model)) == ["double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1"]
    assert attention_alias("transformer_blocks.1.attn") == "double_blocks.1"
    assert attention_alias("transformer_blocks.1") == "double_blocks.1"
    assert attention_alias("single_transformer_blocks.0.attn") == "single_blocks.0"
    assert attention_alias("single_transformer_blocks.12") == "single_blocks.12"
    assert attention_alias("double_blocks.3.img_attn") == "double_blocks.3"
    assert attention_alias("single_blocks.1") == "single_blocks.1"
    found = resolve_layers(model, ["transformer_blocks.0.attn", "single_transformer_blocks.1"], attention_alias)
    assert found["transformer_blocks.0.attn"] is model.double_blocks[0].attend
    with pytest.raises(ConfigError, match="unknown attention layer"):
        resolve_layers(model, ["transformer_blocks.7.attn"], attention_alias)

    # a patch on a named layer changes only the patched batch rows
    inputs = flux_inputs()
    with torch.no_grad():
        plain = model(**inputs)
        with patch_attention(found, slice(1, 2), lambda q, k, v, attend: v):
            patched = model(**inputs)
    assert torch.equal(patched[0], plain[0]) and not torch.allclose(patched[1], plain[1])
