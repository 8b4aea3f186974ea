"""The LDM KL autoencoder (Rombach et al. 2022) that FLUX.1, FLUX.2, SDXL and SD3 all use, with
other numbers (``diffcore.nn.params.AutoEncoderParams``): a convolutional encoder to a diagonal
Gaussian over latents, a decoder back, the latent normalisation the denoiser sees, and tiled
decoding for latents too large to decode at once.

Parameter names are the original code's (``encoder.down.0.block.1.conv1``, ``mid.attn_1.q``),
which BFL's and Stability's files keep; the quant convs live inside the encoder and decoder
(``encoder.quant_conv``, ``decoder.post_quant_conv``) as in BFL's FLUX.2 files. Other layouts
convert through ``diffcore.nn.autoencoder_keys``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffcore.nn.attention import Attention
from diffcore.nn.params import AutoEncoderParams

__all__ = ["AutoEncoder", "AutoEncoderParams", "Decoder", "Encoder", "patchify", "unpatchify"]


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
    """Single-head self-attention over all pixels, with 1x1-conv projections and a residual."""

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
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the LDM checkpoints were trained


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """Res blocks at one resolution (``channels[i] -> channels[i + 1]``), then ``resample``: a
    Downsample / Upsample, or ``nn.Identity`` at the encoder's last and the decoder's first level."""

    def __init__(self, channels: list[int], resample: nn.Module, name: str):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b) for a, b in zip(channels[:-1], channels[1:]))
        self.resample_name = name  # "downsample" / "upsample": the checkpoint's key
        setattr(self, name, resample)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return getattr(self, self.resample_name)(x)


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2 * z_channels, H / f, W / f), mean first."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = p.ch
        for i, width in enumerate(widths):
            resample = nn.Identity() if i == len(widths) - 1 else Downsample(width)
            self.down.append(Level([block_in] + [width] * p.num_res_blocks, resample, "downsample"))
            block_in = width
        self.mid = Mid(block_in)
        self.norm_out = norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * p.z_channels, 2 * p.z_channels, 1) if p.quant_conv else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(self.mid(h)))))


class Decoder(nn.Module):
    """Latents (B, z_channels, h, w) -> image (B, out_ch, h * f, w * f); ``up[i]`` works at the
    resolution of ``down[i]``, so it is stored lowest resolution last and run from there."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        block_in = widths[-1]
        self.post_quant_conv = nn.Conv2d(p.z_channels, p.z_channels, 1) if p.quant_conv else nn.Identity()
        self.conv_in = nn.Conv2d(p.z_channels, block_in, 3, padding=1)
        self.mid = Mid(block_in)
        levels = []
        for i in reversed(range(len(widths))):
            levels.insert(0, Level([block_in] + [widths[i]] * (p.num_res_blocks + 1),
                                   Upsample(widths[i]) if i else nn.Identity(), "upsample"))
            block_in = widths[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = norm(block_in)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def patchify(z: Tensor, patch: int = 2) -> Tensor:
    """(B, C, H, W) -> (B, C * patch^2, H / patch, W / patch), channels in (c, ph, pw) order."""
    return rearrange(z, "b c (h ph) (w pw) -> b (c ph pw) h w", ph=patch, pw=patch)


def unpatchify(z: Tensor, patch: int = 2) -> Tensor:
    return rearrange(z, "b (c ph pw) h w -> b c (h ph) (w pw)", ph=patch, pw=patch)


class AutoEncoder(nn.Module):
    """``encode``: images in [-1, 1] -> the normalised latents a denoiser works on; ``decode``:
    back. Normalisation is ``(z - shift_factor) * scale_factor``, or with ``batch_norm`` the
    2x2-patchified latents standardised by ``bn``'s running statistics (FLUX.2)."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        p = self.params = params
        widths = [p.ch * m for m in p.ch_mult]
        if any(w % 32 for w in widths) or p.z_channels < 1 or p.patch < 1:
            raise ValueError(f"autoencoder widths {widths} must be multiples of 32 (GroupNorm groups), "
                             f"z_channels ({p.z_channels}) and patch ({p.patch}) at least 1")
        self.encoder = Encoder(p)
        self.decoder = Decoder(p)
        if p.batch_norm:
            self.bn = nn.BatchNorm2d(p.latent_channels, eps=p.bn_eps, momentum=p.bn_momentum, affine=False)

    @property
    def factor(self) -> int:
        """Pixels per latent pixel along each side, before patchify (8 for FLUX, SDXL, SD3)."""
        return self.params.factor

    @property
    def downscale(self) -> int:
        """Pixels per element of ``encode``'s output along each side (FLUX.2: 8 x 2 = 16)."""
        return self.params.downscale

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance (clamped to [-30, 20]) of the raw, unnormalised latents."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """The posterior mean (or, with ``sample``, a draw from the posterior), normalised."""
        mean, logvar = self.moments(x)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        return self.normalize(patchify(z, self.params.patch) if self.params.patch > 1 else z)

    def decode(self, z: Tensor) -> Tensor:
        z = self.denormalize(z)
        return self.decoder(unpatchify(z, self.params.patch) if self.params.patch > 1 else z)

    def normalize(self, z: Tensor) -> Tensor:
        """Raw (patchified) latents -> what the denoiser sees."""
        if self.params.batch_norm:
            mean, std = self._stats(z)
            return (z - mean) / std
        return (z - self.params.shift_factor) * self.params.scale_factor

    def denormalize(self, z: Tensor) -> Tensor:
        if self.params.batch_norm:
            mean, std = self._stats(z)
            return z * std + mean
        return z / self.params.scale_factor + self.params.shift_factor

    def _stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.bn.running_mean.view(1, -1, 1, 1).to(z)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.bn.eps).to(z)
        return mean, std

    def decode_tiled(self, z: Tensor, tile: int = 64, overlap: int = 16) -> Tensor:
        """Decode ``tile`` x ``tile`` latent windows overlapping by ``overlap`` and blend them with
        linear ramps across each overlap, so memory depends on ``tile``, not on the image size.
        Latents no larger than one tile are decoded whole."""
        height, width = z.shape[-2:]
        if height <= tile and width <= tile:
            return self.decode(z)
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap {overlap} must be in [0, tile {tile})")
        f, out, total = self.downscale, None, None
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
