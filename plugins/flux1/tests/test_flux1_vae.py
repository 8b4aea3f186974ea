"""The FLUX.1 autoencoder against diffusers' AutoencoderKL configured as FLUX's."""

import pytest
import torch
from torch import nn

from diffcore.api import CheckpointError
from diffcore_flux1.vae import (
    AE_VARIANTS,
    AutoEncoder,
    pack,
    unpack,
    vae_bfl_to_diffusers,
    vae_diffusers_to_bfl,
    vae_to_bfl,
)

TOL = 1e-5  # per unit of signal: the two implementations normalise and attend through different kernels


def close(got, expected):
    err = (got - expected).abs().max().item()
    assert err <= TOL * max(1.0, expected.abs().max().item()), f"max abs err {err:.3g}"


def ours_from(ref) -> AutoEncoder:
    model = AutoEncoder(AE_VARIANTS["tiny"]).eval()
    model.load_state_dict(vae_diffusers_to_bfl(dict(ref.state_dict())), strict=True)
    return model


@torch.no_grad()
def test_encode_decode_parity(diffusers_vae):
    ours = ours_from(diffusers_vae)
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = diffusers_vae.encode(x).latent_dist.mean
    close(ours.moments(x)[0], mean)
    z = ours.encode(x)
    close(z, (mean - 0.1159) * 0.3611)
    raw = torch.randn(2, 16, 16, 24, generator=torch.Generator().manual_seed(1))
    expected = diffusers_vae.decode(raw).sample
    assert expected.abs().max() > 0.5
    close(ours.decode((raw - 0.1159) * 0.3611), expected)
    # sampling draws from the posterior: reproducible with a generator, different from the mean
    a = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
    b = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.allclose(a, z)


def test_key_conversion_round_trip(diffusers_vae):
    sd = diffusers_vae.state_dict()
    bfl = vae_diffusers_to_bfl(dict(sd))
    assert bfl["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert bfl["decoder.up.1.upsample.conv.weight"].equal(sd["decoder.up_blocks.0.upsamplers.0.conv.weight"])
    back = vae_bfl_to_diffusers(dict(bfl))
    assert back.keys() == sd.keys() and all(back[k].equal(sd[k]) for k in sd)
    assert vae_to_bfl(dict(sd)).keys() == bfl.keys()
    prefixed = {f"first_stage_model.{k}": v for k, v in bfl.items()}
    prefixed["model.diffusion_model.img_in.weight"] = torch.zeros(1)  # an all-in-one file's transformer
    assert vae_to_bfl(prefixed).keys() == bfl.keys()
    with pytest.raises(CheckpointError, match="not a FLUX.1 VAE"):
        vae_to_bfl({"img_in.weight": torch.zeros(1)})


def test_full_size_keys_match_diffusers():
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        ref = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                            use_quant_conv=False, use_post_quant_conv=False)
        ours = AutoEncoder(AE_VARIANTS["flux1"])
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in vae_bfl_to_diffusers(dict(ours.state_dict())).items()} == expected
    assert sum(p.numel() for p in ours.parameters()) == 83_819_683
    assert ours.factor == 8


def test_pack_unpack():
    z = torch.randn(2, 16, 6, 8)
    tokens = pack(z)
    assert tokens.shape == (2, 12, 64)
    assert torch.equal(tokens[0, 1], z[0, :, 0:2, 2:4].reshape(-1))  # token (row 0, col 1): (c, ph, pw) order
    assert torch.equal(unpack(tokens, 6, 8), z)
    with pytest.raises(ValueError, match=r"must be even .*\(5, 8\)"):
        pack(torch.randn(1, 16, 5, 8))


class Pointwise(nn.Module):
    """A decoder whose output pixel depends on one latent pixel: tiles must agree with the whole."""

    def forward(self, z):
        return torch.tanh(nn.functional.interpolate(z[:, :3], scale_factor=2.0, mode="nearest") * 3)


@torch.no_grad()
def test_tiled_decode_blends_tiles_into_the_whole(diffusers_vae):
    vae = ours_from(diffusers_vae)
    z = torch.randn(1, 16, 21, 30)
    assert torch.equal(vae.decode_tiled(z, tile=32), vae.decode(z))  # one tile: decoded whole
    tiled = vae.decode_tiled(z, tile=8, overlap=3)
    assert tiled.shape == (1, 3, 42, 60) and torch.isfinite(tiled).all()
    assert (tiled - vae.decode(z)).abs().mean() < 0.5  # same picture, seams aside

    vae.decoder = Pointwise()
    for tile, overlap in ((8, 3), (7, 0), (10, 6)):
        assert torch.allclose(vae.decode_tiled(z, tile=tile, overlap=overlap), vae.decode(z), atol=1e-6)
    with pytest.raises(ValueError, match="overlap 8 must be in"):
        vae.decode_tiled(z, tile=8, overlap=8)
