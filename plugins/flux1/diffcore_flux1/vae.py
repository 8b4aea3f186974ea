"""The FLUX.1 autoencoder: a 16-channel KL autoencoder without quant convs, in BFL's layout
(``src/flux/modules/autoencoder.py``; the LDM encoder/decoder of Rombach et al. 2022), with key
conversion to and from diffusers' ``AutoencoderKL``, latent normalisation, 2x2 packing into the
transformer's 64-channel tokens, and tiled decoding for latents too large to decode at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffcore.api import Attention, CheckpointError
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


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.attend = Attention()

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        out = rearrange(self.attend(q, k, v), "b 1 (h w) c -> b c h w", h=x.shape[-2])
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as trained


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _blocks(channels: list[int]) -> nn.ModuleList:
    return nn.ModuleList(ResnetBlock(a, b) for a, b in zip(channels[:-1], channels[1:]))


class DownLevel(nn.Module):
    """Res blocks at one resolution, then a downsampler (``nn.Identity`` at the last level)."""

    def __init__(self, channels: list[int], downsample: nn.Module):
        super().__init__()
        self.block, self.downsample = _blocks(channels), downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x)


class UpLevel(nn.Module):
    """Res blocks at one resolution, then an upsampler (``nn.Identity`` at full resolution)."""

    def __init__(self, channels: list[int], upsample: nn.Module):
        super().__init__()
        self.block, self.upsample = _blocks(channels), upsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x)


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = p.ch
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            downsample = nn.Identity() if last else Downsample(width)
            self.down.append(DownLevel([block_in] + [width] * p.num_res_blocks, downsample))
            block_in = width
        self.mid = Mid(block_in)
        self.norm_out = norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, 3, padding=1)
        self.mid = Mid(block_in)
        levels = []
        for i in reversed(range(len(widths))):  # stored lowest resolution last, run first
            levels.insert(0, UpLevel([block_in] + [widths[i]] * (p.num_res_blocks + 1),
                                     Upsample(widths[i]) if i else nn.Identity()))
            block_in = widths[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = norm(block_in)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """``encode``: images in [-1, 1] -> normalised latents ``(z - shift) * scale``; ``decode``: back."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        if params.ch % 32 or params.z_channels < 1:
            raise ValueError(f"ch {params.ch} must be a multiple of 32 (GroupNorm groups) and z_channels >= 1")
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)

    @property
    def factor(self) -> int:
        """Pixels per latent pixel along each side (8 for FLUX.1)."""
        return 2 ** (len(self.params.ch_mult) - 1)

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance (clamped to [-30, 20]) of raw, unnormalised latents."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        mean, logvar = self.moments(x)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        return (z - self.params.shift_factor) * self.params.scale_factor

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z / self.params.scale_factor + self.params.shift_factor)

    def decode_tiled(self, z: Tensor, tile: int = 64, overlap: int = 16) -> Tensor:
        """Decode ``tile`` x ``tile`` latent windows overlapping by ``overlap`` and blend them with
        linear ramps across each overlap, so memory depends on ``tile``, not on the image size.
        Latents no larger than one tile are decoded whole."""
        height, width = z.shape[-2:]
        if height <= tile and width <= tile:
            return self.decode(z)
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap {overlap} must be in [0, tile {tile})")
        f, out, total = self.factor, None, None
        for top in _starts(height, tile, overlap):
            for left in _starts(width, tile, overlap):
                part = self.decode(z[..., top:top + tile, left:left + tile]).float()
                rows, cols = part.shape[-2:]
                w = (_ramp(rows, overlap * f, top > 0, top + tile < height, part.device)[:, None]
                     * _ramp(cols, overlap * f, left > 0, left + tile < width, part.device)[None, :])
                if out is None:
                    out = part.new_zeros(*part.shape[:2], height * f, width * f)
                    total = part.new_zeros(height * f, width * f)
                out[..., top * f:top * f + rows, left * f:left * f + cols] += part * w
                total[top * f:top * f + rows, left * f:left * f + cols] += w
        return (out / total).to(z.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def _starts(n: int, tile: int, overlap: int) -> list[int]:
    starts = list(range(0, max(n - tile, 0) + 1, tile - overlap))
    if starts[-1] + tile < n:
        starts.append(n - tile)
    return starts


def _ramp(length: int, width: int, rise: bool, fall: bool, device: torch.device) -> Tensor:
    """Blend weights along one side of a tile: ramps up over the first ``width`` pixels when another
    tile precedes it, down over the last ``width`` when one follows; 1 elsewhere (never 0)."""
    w = torch.ones(length, device=device)
    width = min(width, length)
    if width:
        up = (torch.arange(width, device=device) + 0.5) / width
        if rise:
            w[:width] = torch.minimum(w[:width], up)
        if fall:
            w[-width:] = torch.minimum(w[-width:], up.flip(0))
    return w


# -- keys: BFL <-> diffusers AutoencoderKL -------------------------------------------------------
_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _levels(keys: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _rename(sd: dict[str, Tensor], rules: list[tuple[str, str | Callable]]) -> dict[str, Tensor]:
    out = {}
    for key in list(sd):
        new = key
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new)
        out[new] = sd.pop(key)
    return out


def vae_bfl_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """BFL ``ae.safetensors`` keys -> diffusers ``AutoencoderKL`` (1x1-conv attention -> linear)."""
    n = _levels(list(sd), r"decoder\.up\.(\d+)\.")
    flip = lambda m: f"decoder.up_blocks.{n - 1 - int(m.group(1))}."  # noqa: E731 - BFL stores up levels reversed
    out = _rename(sd, [
        (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
        (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"^decoder\.up\.(\d+)\.", flip),
        (r"^(decoder\.up_blocks\.\d+\.)block\.", r"\1resnets."),
        (r"^(decoder\.up_blocks\.\d+\.)upsample\.", r"\1upsamplers.0."),
        (r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}."),
        (r"\.mid\.attn_1\.(norm|q|k|v|proj_out)\.", lambda m: f".mid_block.attentions.0.{_ATTN_NAMES[m.group(1)]}."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
    ])
    for key, t in out.items():
        if ".attentions.0.to_" in key and key.endswith(".weight") and t.ndim == 4:
            out[key] = t[:, :, 0, 0]
    return out


def vae_diffusers_to_bfl(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``AutoencoderKL`` keys -> BFL (linear attention projections -> 1x1 convs)."""
    n = _levels(list(sd), r"decoder\.up_blocks\.(\d+)\.")
    flip = lambda m: f"decoder.up.{n - 1 - int(m.group(1))}."  # noqa: E731
    names = {v: k for k, v in _ATTN_NAMES.items()}
    out = _rename(sd, [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.", flip),
        (r"^(decoder\.up\.\d+\.)resnets\.", r"\1block."),
        (r"^(decoder\.up\.\d+\.)upsamplers\.0\.", r"\1upsample."),
        (r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}."),
        (r"\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
         lambda m: f".mid.attn_1.{names[m.group(1)]}."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
    ])
    for key, t in out.items():
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and t.ndim == 2:
            out[key] = t[:, :, None, None]
    return out


def vae_to_bfl(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Any FLUX.1 VAE layout -> BFL: diffusers, BFL, or BFL keys under a ``vae.`` /
    ``first_stage_model.`` prefix (all-in-one files; only those keys are kept)."""
    for prefix in ("first_stage_model.", "vae."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd):
        return vae_diffusers_to_bfl(sd)
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in sd):
        return sd
    raise CheckpointError("not a FLUX.1 VAE checkpoint: no encoder.down.* (BFL) or encoder.down_blocks.* "
                          f"(diffusers) keys; first keys: {', '.join(sorted(sd)[:5])}")
