"""The SDXL UNet against diffusers: outputs on tiny random weights, keys at full size."""

import pytest
import torch

from diffcore.api import ConfigError, attention_layers, patch_attention, resolve_layers
from diffcore_sdxl.convert import diffusers_to_stability, detect_layout, structure, to_diffusers, to_stability
from diffcore_sdxl.model import VARIANTS, UNet, attention_alias, label_vector

TOL = 1e-5


def ours_from(ref, variant: str) -> UNet:
    model = UNet(VARIANTS[variant]).eval()
    model.load_state_dict(diffusers_to_stability(dict(ref.state_dict())), strict=True)
    return model


@pytest.mark.usefixtures("reference_matmuls")
@pytest.mark.parametrize("variant", ["tiny", "tiny-refiner"])
@torch.no_grad()
def test_parity_with_diffusers(diffusers_unet, unet_inputs, variant):
    ref = diffusers_unet(variant)
    ours = ours_from(ref, variant)
    params = VARIANTS[variant]
    x, t, context, pooled, time_ids = unet_inputs(params)
    expected = ref(x, t, encoder_hidden_states=context,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    got = ours(x, t, context, label_vector(pooled, time_ids, params.time_embed_scalar_dim))
    err = (got - expected).abs().max().item()
    assert expected.abs().max() > 0.5  # a real signal, not zeros
    assert err <= TOL, f"max abs err {err:.3g}"


@pytest.mark.usefixtures("reference_matmuls")
@torch.no_grad()
def test_odd_latent_size_matches_diffusers(diffusers_unet, unet_inputs):
    """A latent whose side is not a multiple of 4 (an image of 72 x 40 pixels): the up path
    resizes to the skip connection's size, as diffusers' forward_upsample_size does."""
    ref = diffusers_unet("tiny")
    ours = ours_from(ref, "tiny")
    params = VARIANTS["tiny"]
    x, t, context, pooled, time_ids = unet_inputs(params, h=9, w=5)
    expected = ref(x, t, encoder_hidden_states=context,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    got = ours(x, t, context, label_vector(pooled, time_ids, params.time_embed_scalar_dim))
    assert got.shape == (2, 4, 9, 5)
    assert (got - expected).abs().max().item() <= TOL


def test_conversion_round_trip_and_detection(diffusers_unet):
    sd = diffusers_unet("tiny-refiner").state_dict()
    assert detect_layout(sd) == "diffusers"
    ours = diffusers_to_stability(dict(sd))
    assert detect_layout(ours) == "stability"
    assert structure(ours, "stability") == structure(sd, "diffusers") == (4, 2, (False, True, True, False))
    assert ours.keys() == UNet(VARIANTS["tiny-refiner"]).to("meta").state_dict().keys()
    back = to_diffusers(dict(ours))
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)
    single = {f"model.diffusion_model.{k}": v for k, v in ours.items()}
    single["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)   # an all-in-one file's VAE
    assert detect_layout(single) == "single-file" and to_stability(single).keys() == ours.keys()


def test_unknown_keys_pass_through(diffusers_unet):
    sd = dict(diffusers_unet("tiny").state_dict())
    sd["lora_unet.weight"] = torch.zeros(1)
    assert "lora_unet.weight" in diffusers_to_stability(sd)


def _full(variant: str) -> dict:
    """The diffusers config of stabilityai/stable-diffusion-xl-{base,refiner}-1.0's unet (facts file, part B)."""
    base = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256, norm_num_groups=32)
    if variant == "base-1.0":
        return dict(base, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                    projection_class_embeddings_input_dim=2816)
    return dict(base, block_out_channels=(384, 768, 1536, 1536), transformer_layers_per_block=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(6, 12, 24, 24), cross_attention_dim=1280,
                projection_class_embeddings_input_dim=2560)


@pytest.mark.parametrize("variant, keys, params", [("base-1.0", 1680, 2_567_463_684),
                                                   ("refiner-1.0", 1220, 2_259_526_660)])
def test_full_size_keys_match_diffusers(variant, keys, params):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ref = UNet2DConditionModel(**_full(variant))
        ours = UNet(VARIANTS[variant])
    ours_sd = ours.state_dict()
    assert len(ours_sd) == keys and sum(p.numel() for p in ours.parameters()) == params
    converted = to_diffusers({k: v for k, v in ours_sd.items()})
    ref_sd = ref.state_dict()
    assert converted.keys() == ref_sd.keys()
    assert all(converted[k].shape == ref_sd[k].shape for k in ref_sd)


def test_attention_layers_and_aliases():
    model = UNet(VARIANTS["tiny"]).to("meta")
    layers = attention_layers(model)
    params = VARIANTS["tiny"]
    # one self-attention op per SpatialTransformer, one cross-attention op per block
    assert {"input_blocks.4.1", "input_blocks.8.1", "middle_block.1", "output_blocks.0.1", "output_blocks.5.1",
            "input_blocks.8.1.transformer_blocks.1.attn2"} <= layers.keys()
    assert "input_blocks.1.1" not in layers   # level 0 has no attention
    for ours in layers:
        assert attention_alias(ours, params) == ours
    found = resolve_layers(model, ["down_blocks.2.attentions.1", "mid_block.attentions.0",
                                   "up_blocks.0.attentions.1", "up_blocks.1.attentions.2.transformer_blocks.0.attn2"],
                           lambda name: attention_alias(name, params))
    expected = ["input_blocks.8.1", "middle_block.1", "output_blocks.1.1",
                "output_blocks.5.1.transformer_blocks.0.attn2"]
    assert all(layers[k] is v for k, v in zip(expected, found.values(), strict=True))
    with pytest.raises(ConfigError, match="unknown attention layer"):
        resolve_layers(model, ["down_blocks.0.attentions.0"], lambda name: attention_alias(name, params))


@pytest.mark.usefixtures("reference_matmuls")
@torch.no_grad()
def test_transformer_op_patches_every_block(diffusers_unet, unet_inputs):
    """Patching ``mid_block.attentions.0`` reaches the self-attention of both its blocks, and only there."""
    params = VARIANTS["tiny"]
    model = UNet(params).eval()
    x, t, context, pooled, time_ids = unet_inputs(params)
    y = label_vector(pooled, time_ids, params.time_embed_scalar_dim)
    calls = []

    def identity(q, k, v, attend):
        calls.append(q.shape)
        return v

    layers = resolve_layers(model, ["mid_block.attentions.0"], lambda name: attention_alias(name, params))
    plain = model(x, t, context, y)
    with patch_attention(layers, slice(1, 2), identity):
        patched = model(x, t, context, y)
    assert len(calls) == params.transformer_depth_middle and all(s[0] == 1 for s in calls)
    assert torch.equal(patched[0], plain[0]) and not torch.allclose(patched[1], plain[1])


@pytest.mark.usefixtures("onednn_matmuls")
@torch.no_grad()
def test_onednn_path_is_as_accurate_as_diffusers(diffusers_unet, unet_inputs):
    """The fast CPU path (oneDNN linears and convolutions with kept blocked weights, sums and the
    GEGLU gate inside the matmuls) against diffusers run in float64: its error is of the order
    of diffusers' own fp32 error."""
    import copy

    ref = diffusers_unet("tiny")
    ours = ours_from(ref, "tiny")
    params = VARIANTS["tiny"]
    x, t, context, pooled, time_ids = unet_inputs(params)
    y = label_vector(pooled, time_ids, params.time_embed_scalar_dim)
    ref64 = copy.deepcopy(ref).double()
    truth = ref64(x.double(), t.double(), encoder_hidden_states=context.double(),
                  added_cond_kwargs={"text_embeds": pooled.double(), "time_ids": time_ids.double()}).sample
    theirs = ref(x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    for _ in range(2):   # the second call runs on the kept weights
        got = ours(x, t, context, y)
        assert got.is_contiguous()
        assert (got.double() - truth).abs().max() <= 4 * (theirs.double() - truth).abs().max() + 1e-6
