"""SD3's autoencoder on the core's LDM autoencoder, against diffusers' AutoencoderKL."""

import pytest
import torch
from safetensors.torch import save_file

from diffcore.api import CheckpointError, vae_diffusers_to_ldm
from diffcore_sd3.vae import SD3_VAE, load_vae


@torch.no_grad()
def test_vae_matches_diffusers_in_both_layouts(tiny_pipeline, tmp_path):
    """encode = (mean - 0.0609) * 1.5305 and decode its inverse, as StableDiffusion3Pipeline
    scales latents; the diffusers folder and a Stability all-in-one file load the same weights."""
    folder, pipe = tiny_pipeline
    ref = pipe.vae
    ours = load_vae(folder)
    assert (ours.params.scale_factor, ours.params.shift_factor) == (1.5305, 0.0609) == \
        (SD3_VAE.scale_factor, SD3_VAE.shift_factor)
    assert not ours.params.quant_conv and ours.params.z_channels == 16
    image = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = (ref.encode(image).latent_dist.mean - 0.0609) * 1.5305
    latents = ours.encode(image)
    assert latents.shape == (1, 16, 8, 6) and (latents - expected).abs().max() <= 1e-5
    decoded = ref.decode(latents / 1.5305 + 0.0609).sample
    assert (ours.decode(latents) - decoded).abs().max() <= 1e-5

    ldm = {f"first_stage_model.{k}": v for k, v in vae_diffusers_to_ldm(dict(ref.state_dict())).items()}
    save_file({**ldm, "model.diffusion_model.pos_embed": torch.zeros(1, 4, 8)}, tmp_path / "sd3_all_in_one.safetensors")
    single = load_vae(tmp_path / "sd3_all_in_one.safetensors")
    assert torch.equal(single.encode(image), latents)


def test_other_autoencoders_are_refused(tmp_path):
    from diffusers import AutoencoderKL

    sdxl = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32)
    save_file(vae_diffusers_to_ldm(dict(sdxl.state_dict())), tmp_path / "sdxl_vae.safetensors")
    with pytest.raises(CheckpointError, match="4 latent channels and quant convs, not SD3's"):
        load_vae(tmp_path / "sdxl_vae.safetensors")
    save_file({"model.diffusion_model.pos_embed": torch.zeros(1, 4, 8)}, tmp_path / "mmdit_only.safetensors")
    with pytest.raises(CheckpointError, match="mmdit_only.safetensors: no SD3 autoencoder in it"):
        load_vae(tmp_path / "mmdit_only.safetensors")
