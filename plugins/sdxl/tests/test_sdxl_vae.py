"""The SDXL VAE (the core's LDM autoencoder) against diffusers' AutoencoderKL on tiny random weights."""

import json

import pytest
import torch
from safetensors.torch import save_file

from diffcore.api import CheckpointError, vae_diffusers_to_ldm, vae_ldm_to_stability
from diffcore_sdxl.vae import load_vae, vae_dtype

TOL = 1e-5


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.usefixtures("reference_matmuls")
@torch.no_grad()
def test_parity_with_diffusers(tiny_pipelines, images, tmp_path):
    folder, pipe = tiny_pipelines["base"]
    ref = pipe.vae
    expected_z = ref.encode(images).latent_dist.mean * ref.config.scaling_factor
    expected_x = ref.decode(expected_z / ref.config.scaling_factor).sample
    # the same weights as Stability's all-in-one checkpoint would hold them
    stability = vae_ldm_to_stability(vae_diffusers_to_ldm(dict(ref.state_dict())))
    save_file({f"first_stage_model.{k}": v.contiguous() for k, v in stability.items()}, tmp_path / "sdxl.safetensors")
    for path in (folder, folder / "vae", tmp_path / "sdxl.safetensors"):
        vae = load_vae(path)
        assert vae.autoencoder.params.scale_factor == 0.13025 and vae.factor == 2
        # each half on the same input: the random decoder turns encode's 4e-8 into 5e-5
        assert (vae.encode(images) - expected_z).abs().max() <= TOL
        assert (vae.decode(expected_z) - expected_x).abs().max() <= TOL


def test_float16_runs_the_vae_in_float32(tiny_pipelines, tmp_path):
    """force_upcast (SDXL's VAE overflows in fp16): weights stay float32, images come back float16."""
    folder, pipe = tiny_pipelines["base"]
    vae = load_vae(folder, dtype=torch.float16)
    assert next(vae.parameters()).dtype == torch.float32
    assert vae.decode(torch.randn(1, 4, 4, 4, dtype=torch.float16)).dtype == torch.float32
    assert vae_dtype(torch.bfloat16, True) == torch.bfloat16   # bfloat16 has float32's range
    fixed = tmp_path / "fp16-fix"
    pipe.vae.save_pretrained(fixed)
    config = json.loads((fixed / "config.json").read_text())
    (fixed / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    assert next(load_vae(fixed, dtype=torch.float16).parameters()).dtype == torch.float16


@torch.no_grad()
def test_tiled_decode(tiny_pipelines):
    """``vae_tile = 8``: 8 x 8 latent tiles overlapping by 2; where one tile alone covers the image
    (before the first overlap) the output is that tile's decode; latents within one tile decode whole."""
    folder = tiny_pipelines["base"][0]
    whole, tiled = load_vae(folder), load_vae(folder, tile=8)
    z = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(1))
    out = tiled.decode(z)
    assert out.shape == (1, 3, 32, 48) and torch.isfinite(out).all()
    corner = whole.decode(z[..., :8, :8])[..., :12, :12]
    assert torch.allclose(out[..., :12, :12], corner, atol=1e-6)
    assert torch.equal(tiled.decode(z[..., :8, :8]), whole.decode(z[..., :8, :8]))


def test_other_autoencoders_are_refused(tmp_path, tiny_pipelines):
    sd = vae_diffusers_to_ldm(dict(tiny_pipelines["base"][1].vae.state_dict()))
    flux_like = {k: v.contiguous() for k, v in sd.items() if "quant_conv" not in k}
    save_file(flux_like, tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match="SDXL's has 4, with"):
        load_vae(tmp_path / "ae.safetensors")
