"""The core's LDM autoencoder configured as SDXL's and SD3's, against diffusers' AutoencoderKL
(FLUX.1's and FLUX.2's are checked in their plugins' tests), and its key conversions."""

import attrs
import pytest
import torch

from diffcore.errors import CheckpointError
from diffcore.nn.autoencoder import AutoEncoder, patchify, unpatchify
from diffcore.nn.autoencoder_keys import (
    vae_diffusers_config,
    vae_diffusers_to_ldm,
    vae_ldm_to_diffusers,
    vae_ldm_to_stability,
    vae_params_from_diffusers,
    vae_params_from_shapes,
    vae_to_ldm,
)
from diffcore.nn.params import AutoEncoderParams

SDXL = AutoEncoderParams(z_channels=4, quant_conv=True, scale_factor=0.13025)
SD3 = AutoEncoderParams(z_channels=16, scale_factor=1.5305, shift_factor=0.0609)
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1)
TOL = 1e-5


def diffusers_vae(params: AutoEncoderParams):
    from diffusers import AutoencoderKL

    config = {k: v for k, v in vae_diffusers_config(params).items() if k != "_class_name"}
    model = AutoencoderKL(**config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            unit = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if unit else 0.0))
    return model.eval()


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
@torch.no_grad()
def test_tiny_sdxl_and_sd3_autoencoders_match_diffusers(family):
    params = attrs.evolve(SDXL if family == "sdxl" else SD3, **TINY)
    ref = diffusers_vae(params)
    ours = AutoEncoder(params).eval()
    ours.load_state_dict(vae_diffusers_to_ldm(dict(ref.state_dict())), strict=True)
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = ref.encode(x).latent_dist.mean
    z = ours.encode(x)
    expected = (mean - params.shift_factor) * params.scale_factor  # what each pipeline feeds its denoiser
    assert z.shape == (1, params.z_channels, 8, 12)
    assert (z - expected).abs().max() <= TOL * max(1.0, expected.abs().max().item())
    pixels = ref.decode(expected / params.scale_factor + params.shift_factor).sample
    assert pixels.abs().max() > 0.1
    assert (ours.decode(z) - pixels).abs().max() <= TOL * max(1.0, pixels.abs().max().item())


@pytest.mark.parametrize("family, params, count, keys", [
    ("sdxl", SDXL, 83_653_863, 248), ("sd3", SD3, 83_819_683, 244)])
def test_full_size_keys_and_parameter_counts(family, params, count, keys):
    from diffusers import AutoencoderKL

    config = {k: v for k, v in vae_diffusers_config(params).items() if k != "_class_name"}
    with torch.device("meta"):
        ref, ours = AutoencoderKL(**config), AutoEncoder(params)
    mine = ours.state_dict()
    assert len(mine) == keys and sum(t.numel() for t in mine.values()) == count  # the facts file's numbers
    converted = vae_ldm_to_diffusers(dict(mine))
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert ours.factor == ours.downscale == 8


def test_stability_layout_round_trip_and_prefixes():
    ours = AutoEncoder(attrs.evolve(SDXL, **TINY)).state_dict()
    stability = vae_ldm_to_stability(dict(ours))
    assert "quant_conv.weight" in stability and "post_quant_conv.bias" in stability
    assert not any(k.startswith(("encoder.quant_conv", "decoder.post_quant_conv")) for k in stability)
    all_in_one = {f"first_stage_model.{k}": v for k, v in stability.items()}
    all_in_one["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)  # the UNet's part
    back = vae_to_ldm(all_in_one)
    assert back.keys() == ours.keys() and all(back[k] is ours[k] for k in ours)
    diffusers = vae_ldm_to_diffusers(dict(ours))
    assert "quant_conv.weight" in diffusers and diffusers["encoder.mid_block.attentions.0.to_q.weight"].ndim == 2
    assert vae_to_ldm(dict(diffusers)).keys() == ours.keys()
    with pytest.raises(CheckpointError, match="not an SDXL VAE checkpoint: no encoder.down"):
        vae_to_ldm({"conv_in.weight": torch.zeros(1)}, what="an SDXL VAE")


@pytest.mark.parametrize("params", [SDXL, SD3, AutoEncoderParams(z_channels=32, quant_conv=True, batch_norm=True,
                                                                   patch=2, **TINY)], ids=["sdxl", "sd3", "flux2"])
def test_params_read_back_from_shapes_and_diffusers_configs(params):
    with torch.device("meta"):
        state = AutoEncoder(params).state_dict()
    shapes = {k: tuple(v.shape) for k, v in vae_ldm_to_diffusers(dict(state)).items()}
    unstored = dict(scale_factor=params.scale_factor, shift_factor=params.shift_factor)
    assert vae_params_from_shapes(shapes, **unstored) == params
    assert vae_params_from_diffusers(vae_diffusers_config(params)) == params


def test_batch_norm_latents_are_patchified_and_standardised():
    params = AutoEncoderParams(z_channels=4, quant_conv=True, batch_norm=True, patch=2, **TINY)
    ae = AutoEncoder(params).eval()
    with torch.no_grad():
        ae.bn.running_mean.normal_()
        ae.bn.running_var.uniform_(0.5, 2.0)
    x = torch.rand(1, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        raw = ae.moments(x)[0]
        z = ae.encode(x)
    assert z.shape == (1, 16, 4, 6) and ae.downscale == 4 and params.latent_channels == 16
    std = torch.sqrt(ae.bn.running_var + 1e-4).view(1, -1, 1, 1)
    torch.testing.assert_close(z, (patchify(raw) - ae.bn.running_mean.view(1, -1, 1, 1)) / std)
    torch.testing.assert_close(unpatchify(ae.denormalize(z)), raw)
    with pytest.raises(ValueError, match=r"widths \[24, 48\] must be multiples of 32"):
        AutoEncoder(attrs.evolve(params, ch=24))
