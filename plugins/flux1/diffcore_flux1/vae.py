"""The FLUX.1 autoencoder: the core's LDM autoencoder (``diffcore.nn.autoencoder``) with 16
latent channels, no quant convs and ``(z - 0.1159) * 0.3611`` (``params.AE_VARIANTS``), and the
2x2 packing of its latents into the transformer's 64-channel tokens. BFL's ``ae.safetensors``
is the LDM layout, so its keys are the module's own.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor

from diffcore.api import AutoEncoder, vae_to_ldm
from diffcore.api import vae_diffusers_to_ldm as vae_diffusers_to_bfl
from diffcore.api import vae_ldm_to_diffusers as vae_bfl_to_diffusers
from diffcore_flux1.params import AE_VARIANTS, AutoEncoderParams

__all__ = ["AE_VARIANTS", "AutoEncoder", "AutoEncoderParams", "pack", "unpack", "vae_bfl_to_diffusers",
           "vae_diffusers_to_bfl", "vae_to_bfl"]


def pack(z: Tensor) -> Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens, each a 2x2 patch in (c, ph, pw) order."""
    if z.shape[-2] % 2 or z.shape[-1] % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2, got {tuple(z.shape[-2:])}")
    return rearrange(z, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(x: Tensor, height: int, width: int) -> Tensor:
    """Tokens back to (B, C, height, width) latents; ``height``, ``width`` are the latent's (not the image's)."""
    return rearrange(x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // 2, w=width // 2, ph=2, pw=2)


def vae_to_bfl(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Any FLUX.1 VAE layout -> BFL: diffusers, BFL, or BFL keys under a ``vae.`` /
    ``first_stage_model.`` prefix (all-in-one files; only those keys are kept)."""
    return vae_to_ldm(sd, what="a FLUX.1 VAE")
