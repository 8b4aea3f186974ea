"""Our FLUX.2 autoencoder against diffusers' AutoencoderKLFlux2 plus its pipelines' BatchNorm handling."""

from __future__ import annotations

import pytest
import torch

from diffcore.api import CheckpointError, save_file_atomic
from diffcore_flux2.load import load_ae
from diffcore_flux2.params import AE_VARIANTS
from diffcore_flux2.vae import AutoEncoder, ae_bfl_to_diffusers, ae_diffusers_to_bfl, ae_to_bfl, patchify, unpatchify

TOL = 1e-5


def _bn(vae):
    """What diffusers' Flux2 pipelines do around the VAE: (B, 128, h, w) statistics, eps 1e-4."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std


def test_encode_matches_diffusers_mean_patchify_normalise(diffusers_vae, ae_from):
    ae = ae_from(diffusers_vae)
    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean, std = _bn(diffusers_vae)
        expected = (patchify(diffusers_vae.encode(x).latent_dist.mode()) - mean) / std
        got = ae.encode(x)
    err = (got - expected).abs().max().item()
    print(f"VAE encode parity: max abs err {err:.3g} (latents max {expected.abs().max().item():.3g})")
    assert got.shape == (2, 16, 4, 6)
    assert err <= TOL


def test_decode_matches_diffusers_denormalise_unpatchify_decode(diffusers_vae, ae_from):
    ae = ae_from(diffusers_vae)
    z = torch.randn(2, 16, 3, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mean, std = _bn(diffusers_vae)
        expected = diffusers_vae.decode(unpatchify(z * std + mean)).sample
        got = ae.decode(z)
    err = (got - expected).abs().max().item()
    print(f"VAE decode parity: max abs err {err:.3g} (pixels max {expected.abs().max().item():.3g})")
    assert got.shape == (2, 3, 12, 20)
    assert err <= TOL


def test_patchify_order_is_channel_then_patch_row_then_patch_column():
    z = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)
    p = patchify(z)
    assert p.shape == (1, 8, 2, 3)
    assert p[0, :4, 0, 0].tolist() == [z[0, 0, 0, 0], z[0, 0, 0, 1], z[0, 0, 1, 0], z[0, 0, 1, 1]]
    assert p[0, 4, 1, 2] == z[0, 1, 2, 4]
    assert torch.equal(unpatchify(p), z)


def test_normalisation_round_trip_and_eps(diffusers_vae, ae_from):
    ae = ae_from(diffusers_vae)
    assert ae.bn.eps == 1e-4 and not ae.bn.affine
    z = torch.randn(1, 16, 2, 2)
    torch.testing.assert_close(ae.denormalize(ae.normalize(z)), z)
    assert ae.downscale == 4 and AE_VARIANTS["flux2"].latent_channels == 128


def test_key_conversion_round_trip(diffusers_vae):
    theirs = diffusers_vae.state_dict()
    mine = ae_diffusers_to_bfl(dict(theirs))
    assert "encoder.quant_conv.weight" in mine and "decoder.post_quant_conv.weight" in mine
    assert mine["encoder.mid.attn_1.q.weight"].ndim == 4 and "decoder.up.1.upsample.conv.weight" in mine
    back = ae_bfl_to_diffusers(dict(mine))
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)


def test_full_size_keys_and_shapes_equal_diffusers():
    from diffusers import AutoencoderKLFlux2

    with torch.device("meta"):
        ours, theirs = AutoEncoder(AE_VARIANTS["flux2"]), AutoencoderKLFlux2()
    mine = ours.state_dict()
    converted = ae_bfl_to_diffusers(dict(mine))
    shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == shapes
    assert mine["bn.running_mean"].shape == (128,) and mine["encoder.conv_out.weight"].shape[0] == 64
    params = sum(t.numel() for t in mine.values() if t.is_floating_point())
    assert round(params / 1e6, 2) == 84.05  # facts file: 84.05 M including the BN statistics


def test_files_in_both_layouts_load(tmp_path, diffusers_vae, ae_from):
    diffusers_vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    bfl = ae_diffusers_to_bfl(dict(diffusers_vae.state_dict()))
    del bfl["bn.num_batches_tracked"]  # BFL's conversion tools do not carry the counter
    save_file_atomic(bfl, tmp_path / "ae.safetensors")
    a, b = load_ae(tmp_path / "vae", variant="tiny"), load_ae(tmp_path / "ae.safetensors", variant="tiny")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(CheckpointError, match="not a FLUX.2 autoencoder"):
        ae_to_bfl({"encoder.conv_in.weight": torch.zeros(1)})
