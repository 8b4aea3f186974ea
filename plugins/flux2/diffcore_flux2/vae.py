"""The FLUX.2 autoencoder (BFL flux2 ``autoencoder.py``) in BFL's checkpoint layout.

The encoder/decoder are the LDM KL autoencoder of FLUX.1 (Rombach et al. 2022) with 32 latent
channels and 1x1 ``quant_conv`` / ``post_quant_conv``. What the transformer sees is the latent
mean, patchified 2x2 into 128 channels (order c, ph, pw) and normalised with the running
statistics of ``bn`` (an affine-free BatchNorm2d, eps 1e-4): ``(p - mean) / sqrt(var + eps)``.
There is no scale/shift factor (0.3611 / 0.1159 are FLUX.1's). ``encode``/``decode`` include
patchify and normalisation; diffusers' ``AutoencoderKLFlux2`` leaves both to its pipelines.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffcore.api import Attention, CheckpointError
from diffcore_flux2.params import AE_VARIANTS, AutoEncoderParams

__all__ = ["AutoEncoder", "AutoEncoderParams", "AE_VARIANTS", "patchify", "unpatchify",
           "ae_bfl_to_diffusers", "ae_diffusers_to_bfl", "ae_to_bfl"]


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, 1x1-conv projections, residual."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v = (nn.Conv2d(c, c, 1) for _ in range(3))
        self.attn = Attention()
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        out = rearrange(self.attn(q, k, v), "b 1 (h w) c -> b c h w", h=x.shape[2])
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the LDM checkpoints expect


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
    return mid


def _run_mid(mid: nn.Module, h: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> moments (B, 2 * z_channels, H / f, W / f), quant_conv included."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        widths = [p.ch * m for m in (1, *p.ch_mult)]
        self.down = nn.ModuleList()
        for i in range(len(p.ch_mult)):
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1])
                                        for j in range(p.num_res_blocks))
            if i != len(p.ch_mult) - 1:
                level.downsample = Downsample(widths[i + 1])
            self.down.append(level)
        self.mid = _mid(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * p.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * p.z_channels, 2 * p.z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(h))))


class Decoder(nn.Module):
    """Latents (B, z_channels, h, w) -> image (B, 3, h * f, w * f), post_quant_conv included;
    ``up[i]`` works at the resolution of ``down[i]`` (so it runs from the last index down)."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        c = p.ch * p.ch_mult[-1]
        self.post_quant_conv = nn.Conv2d(p.z_channels, p.z_channels, 1)
        self.conv_in = nn.Conv2d(p.z_channels, c, 3, padding=1)
        self.mid = _mid(c)
        up = []
        for i in reversed(range(len(p.ch_mult))):
            level = nn.Module()
            c_out = p.ch * p.ch_mult[i]
            level.block = nn.ModuleList(ResnetBlock(c if j == 0 else c_out, c_out)
                                        for j in range(p.num_res_blocks + 1))
            c = c_out
            if i != 0:
                level.upsample = Upsample(c)
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, p.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = _run_mid(self.mid, self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def patchify(z: Tensor, patch: int = 2) -> Tensor:
    return rearrange(z, "b c (h ph) (w pw) -> b (c ph pw) h w", ph=patch, pw=patch)


def unpatchify(z: Tensor, patch: int = 2) -> Tensor:
    return rearrange(z, "b (c ph pw) h w -> b c (h ph) (w pw)", ph=patch, pw=patch)


class AutoEncoder(nn.Module):
    """``encode``: image in [-1, 1] -> normalised patchified latents (B, 128, H/16, W/16);
    ``decode`` is its inverse (up to the autoencoder's loss)."""

    def __init__(self, params: AutoEncoderParams = AE_VARIANTS["flux2"]):
        super().__init__()
        self.params = p = params
        self.encoder = Encoder(p)
        self.decoder = Decoder(p)
        self.bn = nn.BatchNorm2d(p.latent_channels, eps=p.bn_eps, momentum=p.bn_momentum, affine=False)

    @property
    def downscale(self) -> int:
        """Pixels per latent token along each side (16 for FLUX.2: 8x VAE, 2x2 patchify)."""
        return 2 ** (len(self.params.ch_mult) - 1) * self.params.patch

    def encode(self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """The posterior mean (or, with ``sample``, a draw from it), patchified and normalised."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        z = mean
        if sample:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            z = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.normalize(patchify(z, self.params.patch))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(unpatchify(self.denormalize(z), self.params.patch))

    def _stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.bn.running_mean.view(1, -1, 1, 1).to(z)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.bn.eps).to(z)
        return mean, std

    def normalize(self, z: Tensor) -> Tensor:
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, z: Tensor) -> Tensor:
        mean, std = self._stats(z)
        return z * std + mean


# -- BFL <-> diffusers (AutoencoderKLFlux2) keys ---------------------------------------------------
_AE_TOP = {  # BFL -> diffusers
    "encoder.norm_out.": "encoder.conv_norm_out.",
    "decoder.norm_out.": "decoder.conv_norm_out.",
    "encoder.quant_conv.": "quant_conv.",
    "decoder.post_quant_conv.": "post_quant_conv.",
}
_AE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_AE_ATTN_BACK = {v: k for k, v in _AE_ATTN.items()}


def _levels(state: dict[str, Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def ae_bfl_to_diffusers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """BFL autoencoder keys -> ``AutoencoderKLFlux2`` keys (attention 1x1 convs become Linears)."""
    ups = _levels(state, r"decoder\.up\.(\d+)\.")
    out = {}
    for key in list(state):
        t = state.pop(key)
        new = key
        for old, rep in _AE_TOP.items():
            if key.startswith(old):
                new = rep + key[len(old):]
        new = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", new)
        new = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", new)
        new = re.sub(r"^decoder\.up\.(\d+)\.block\.",
                     lambda m: f"decoder.up_blocks.{ups - 1 - int(m.group(1))}.resnets.", new)
        new = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
                     lambda m: f"decoder.up_blocks.{ups - 1 - int(m.group(1))}.upsamplers.0.", new)
        new = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}.", new)
        if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)", new):
            new = f"{m.group(1)}.mid_block.attentions.0.{_AE_ATTN[m.group(2)]}.{m.group(3)}"
            if t.ndim == 4:
                t = t[:, :, 0, 0]
        new = new.replace(".nin_shortcut.", ".conv_shortcut.")
        out[new] = t
    return out


def ae_diffusers_to_bfl(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``AutoencoderKLFlux2`` keys -> BFL keys (attention Linears become 1x1 convs)."""
    ups = _levels(state, r"decoder\.up_blocks\.(\d+)\.")
    back = {v: k for k, v in _AE_TOP.items()}
    out = {}
    for key in list(state):
        t = state.pop(key)
        new = key
        for old, rep in back.items():
            if key.startswith(old):
                new = rep + key[len(old):]
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{ups - 1 - int(m.group(1))}.block.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{ups - 1 - int(m.group(1))}.upsample.", new)
        new = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", new)
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)"
                             r"\.(weight|bias)", new):
            new = f"{m.group(1)}.mid.attn_1.{_AE_ATTN_BACK[m.group(2)]}.{m.group(3)}"
            if t.ndim == 2:
                t = t[:, :, None, None]
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        out[new] = t
    return out


def ae_to_bfl(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Either layout -> BFL keys; the ``rename`` for ``load_model``. BFL's released file may lack
    ``bn.num_batches_tracked`` (a counter nothing reads): it is added as 0."""
    if "bn.running_mean" not in state:
        raise CheckpointError("not a FLUX.2 autoencoder: no bn.running_mean (the latent statistics); "
                              "a FLUX.1 autoencoder has none")
    if any(k.startswith("encoder.down_blocks.") for k in state):
        state = ae_diffusers_to_bfl(state)
    state.setdefault("bn.num_batches_tracked", torch.zeros((), dtype=torch.long))
    return state
