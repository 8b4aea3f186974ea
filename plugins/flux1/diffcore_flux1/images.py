"""Image inputs of FLUX.1's editing variants, built as BFL's ``sampling.prepare_kontext``,
``prepare_fill`` and ``prepare_control`` build them, from tensors instead of files.

- Kontext: the reference image's latents join the sequence as extra tokens whose position ids
  are the reference's own grid at t = 1 (the target's tokens have t = 0); their outputs are dropped.
- Fill: [masked-image latents (64) | mask (256)] is concatenated to the noisy tokens' channels.
  The mask, at pixel resolution, is pixel-unshuffled 8 x 8 (64 channels per latent pixel) and
  then packed 2 x 2 like the latents; the masked image is ``image * (1 - mask)``.
- Canny / Depth: the control image's latents (64 packed channels) are concatenated.

Masks stay soft as in BFL (diffusers' ``FluxFillPipeline`` binarises them at 0.5; a black and
white mask gives both the same result).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from diffcore_flux1.params import KONTEXT_RESOLUTIONS
from diffcore_flux1.vae import pack

def kontext_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) of the Kontext training resolution closest in aspect ratio to the given one."""
    _, w, h = min((abs(width / height - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    return h, w


def token_multiple(size: int, per_token: int = 16) -> int:
    """``size`` in pixels rounded down to whole tokens (16 pixels for FLUX.1), at least one token."""
    return max(per_token, size // per_token * per_token)


def fit(image: Tensor, height: int, width: int) -> Tensor:
    """A (C, H, W) image resized to (height, width) when it is not that size already (bicubic,
    antialiased), keeping its value range."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    low, high = image.min(), image.max()
    resized = F.interpolate(image[None].float(), size=(height, width), mode="bicubic", antialias=True)[0]
    return resized.clamp(low, high).to(image.dtype)


def pack_mask(mask: Tensor, factor: int = 8) -> Tensor:
    """(B, 1, H, W) mask at pixel resolution -> (B, H/16 * W/16, 4 factor^2) tokens: each latent
    pixel's ``factor`` x ``factor`` mask pixels become its channels (pixel unshuffle), then 2x2
    packing as for latents."""
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (batch, 1, height, width), got {tuple(mask.shape)}")
    return pack(rearrange(mask[:, 0], "b (h ph) (w pw) -> b (ph pw) h w", ph=factor, pw=factor))


def fill_condition(masked_latents: Tensor, mask: Tensor) -> Tensor:
    """Fill-dev's extra channels: packed masked-image latents (B, 16, h, w) and the pixel mask
    (B, 1, 8h, 8w) -> (B, h/2 * w/2, 64 + 256)."""
    factor = mask.shape[-1] // masked_latents.shape[-1]
    if mask.shape[-2:] != (factor * masked_latents.shape[-2], factor * masked_latents.shape[-1]):
        raise ValueError(f"mask {tuple(mask.shape[-2:])} is not the latents' {tuple(masked_latents.shape[-2:])} "
                         f"at a whole pixel factor")
    return torch.cat((pack(masked_latents), pack_mask(mask.to(masked_latents), factor)), dim=-1)
