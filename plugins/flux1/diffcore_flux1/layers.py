"""FLUX.1 building blocks, in the layout of BFL's checkpoints (github.com/black-forest-labs/flux,
``src/flux/modules/layers.py``): parameter names here are the checkpoint's keys.

Every softmax(qk)v goes through ``diffcore.nn.attention.Attention`` (the ``attend`` child of a
block), so guidance can patch a block's attention by its name (``double_blocks.3``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffcore.api import Attention, GeluMLP, Linear, linear, plain


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0, time_factor: float = 1000.0) -> Tensor:
    """[cos | sin] sinusoid of ``time_factor * t`` (t is sigma in [0, 1]); frequencies as in DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (time_factor * t)[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb.to(t.dtype) if t.is_floating_point() else emb


class Rotary(NamedTuple):
    """RoPE as two tables broadcastable over (batch, heads, tokens, head_dim), computed once per
    forward: ``cos`` of each channel's angle, and ``sin`` with the sign of the pair's rotation
    folded in (-sin on even channels, +sin on odd), so rotating is ``x * cos + swap(x) * sin``."""

    cos: Tensor
    sin: Tensor


def rope(ids: Tensor, axes_dim: tuple[int, ...], theta: float) -> Rotary:
    """Rotary tables for positions ``ids`` (batch, tokens, axes) -> (batch, 1, tokens, head_dim);
    axis ``i`` of the position owns ``axes_dim[i]`` channels (``axes_dim[i] / 2`` pairs) of each head."""
    # float64 as in BFL and diffusers: positions up to ~100 times 1/theta^(k/d) lose digits in float32
    f64 = torch.float64 if ids.device.type != "mps" else torch.float32
    angles = []
    for i, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=f64, device=ids.device) / dim)
        angles.append(ids[..., i].to(f64)[..., None] * omega)
    angle = torch.cat(angles, dim=-1).repeat_interleave(2, dim=-1)  # both channels of a pair share it
    sign = torch.tensor([-1.0, 1.0], dtype=f64, device=ids.device).repeat(angle.shape[-1] // 2)
    return Rotary(angle.cos().float()[:, None], (angle.sin() * sign).float()[:, None])


def apply_rope(x: Tensor, pe: Rotary) -> Tensor:
    """Rotate consecutive channel pairs (x[2i], x[2i+1]) of ``x`` (batch, heads, tokens, head_dim)
    by their angles: (x0 cos - x1 sin, x1 cos + x0 sin), in float32 as BFL and diffusers do."""
    x32 = x.float()
    even, odd = rearrange(x32, "... (d two) -> ... d two", two=2).unbind(-1)
    swapped = rearrange(torch.stack((odd, even), dim=-1), "... d two -> ... (d two)")
    return (x32 * pe.cos + swapped * pe.sin).type_as(x)


class EmbedND(nn.Module):
    """RoPE tables for n-axis positions (FLUX.1: (t, row, col), axes (16, 56, 56), theta 10000)."""

    def __init__(self, axes_dim: tuple[int, ...], theta: float):
        super().__init__()
        self.axes_dim, self.theta = tuple(axes_dim), theta

    def forward(self, ids: Tensor) -> Rotary:
        if ids.shape[-1] != len(self.axes_dim):
            raise ValueError(f"position ids have {ids.shape[-1]} axes, this model uses {len(self.axes_dim)} "
                             f"(rope axes {self.axes_dim})")
        return rope(ids, self.axes_dim, self.theta)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = Linear(in_dim, hidden_dim)
        self.silu = nn.SiLU()
        self.out_layer = Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS norm in float32 with a learnable ``scale`` (eps 1e-6)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.scale.float(), self.eps).to(x.dtype)


class QKNorm(nn.Module):
    """Per-head RMS norm of queries and keys (head_dim wide)."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """One stream's projections: fused ``qkv``, QK norm, output ``proj``. The softmax is the block's."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = Linear(dim, dim)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(batch, tokens, dim) -> normalised q, k and v, each (batch, heads, tokens, head_dim)."""
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class ModulationOut(NamedTuple):
    shift: Tensor
    scale: Tensor
    gate: Tensor

    def modulate(self, x: Tensor) -> Tensor:
        """adaLN: (1 + scale) * x + shift."""
        return (1 + self.scale) * x + self.shift

    def residual(self, x: Tensor, update: Tensor) -> Tensor:
        """The gated residual: x + gate * update."""
        return x + self.gate * update


class Modulation(nn.Module):
    """adaLN from ``vec``: (shift, scale, gate) once, or twice for a double block (attention, MLP)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> list[ModulationOut]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return [ModulationOut(*out[i:i + 3]) for i in range(0, self.multiplier, 3)]


class DoubleStreamBlock(nn.Module):
    """MMDiT block: image and text keep their own weights and attend jointly over [txt, img]."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(hidden * mlp_ratio)
        self.img_mod = Modulation(hidden, double=True)
        self.img_norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden, num_heads, qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.img_mlp = GeluMLP(hidden, mlp_hidden)
        self.txt_mod = Modulation(hidden, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden, num_heads, qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = GeluMLP(hidden, mlp_hidden)
        self.attend = Attention()

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Rotary) -> tuple[Tensor, Tensor]:
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.heads(img_mod1.modulate(self.img_norm1(img)))
        txt_q, txt_k, txt_v = self.txt_attn.heads(txt_mod1.modulate(self.txt_norm1(txt)))

        q = apply_rope(torch.cat((txt_q, img_q), dim=2), pe)
        k = apply_rope(torch.cat((txt_k, img_k), dim=2), pe)
        attn = rearrange(self.attend(q, k, torch.cat((txt_v, img_v), dim=2)), "B H L D -> B L (H D)")
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]

        img = img_mod1.residual(img, self.img_attn.proj(img_attn))
        img = img_mod2.residual(img, self.img_mlp(img_mod2.modulate(self.img_norm2(img))))
        txt = txt_mod1.residual(txt, self.txt_attn.proj(txt_attn))
        txt = txt_mod2.residual(txt, self.txt_mlp(txt_mod2.modulate(self.txt_norm2(txt))))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint sequence (Dehghani et al. 2023, ViT-22B): one
    ``linear1`` gives [q | k | v | mlp_in], one ``linear2`` maps [attention | GELU(mlp)] back."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden, self.num_heads = hidden, num_heads
        self.mlp_hidden = int(hidden * mlp_ratio)
        self.linear1 = Linear(hidden, 3 * hidden + self.mlp_hidden)
        self.linear2 = Linear(hidden + self.mlp_hidden, hidden)
        self.norm = QKNorm(hidden // num_heads)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(hidden, double=False)
        self.attend = Attention()

    def forward(self, x: Tensor, vec: Tensor, pe: Rotary) -> Tensor:
        (mod,) = self.modulation(vec)
        qkv, mlp = self.project_in(mod.modulate(self.pre_norm(x)))
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        attn = rearrange(self.attend(apply_rope(q, pe), apply_rope(k, pe), v), "B H L D -> B L (H D)")
        return mod.residual(x, self.linear2(torch.cat((attn, mlp), dim=2)))

    def project_in(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``linear1`` -> (qkv, GELU(mlp_in)). When ``linear1`` is plain, as two matmuls on row
        blocks of its weight, so the GELU runs inside the second (oneDNN post-op)."""
        sizes = [3 * self.hidden, self.mlp_hidden]
        if not plain(self.linear1):
            qkv, mlp_in = self.linear1(x).split(sizes, dim=-1)
            return qkv, F.gelu(mlp_in, approximate="tanh")
        (w_qkv, w_mlp), (b_qkv, b_mlp) = self.linear1.weight.split(sizes), self.linear1.bias.split(sizes)
        return linear(x, w_qkv, b_qkv), linear(x, w_mlp, b_mlp, "gelu_tanh")


class LastLayer(nn.Module):
    """adaLN (chunk order shift, scale; diffusers stores scale, shift) then the output projection."""

    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear((1 + scale) * self.norm_final(x) + shift)
