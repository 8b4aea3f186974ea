"""Embeddings diffusion transformers share: the sinusoidal timestep embedding, rotary position
embeddings over n position axes, and the two-layer MLP that lifts either to the hidden size.

Model code calls these and never rewrites them: FLUX.1, FLUX.2, DiT (and SD3's timestep
embedding) are the same formulas with other numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffcore.nn.linear import Linear

__all__ = ["EmbedND", "MLPEmbedder", "apply_rope", "rope", "timestep_embedding"]


def timestep_embedding(t: Tensor, dim: int = 256, *, max_period: float = 10000.0, time_factor: float = 1000.0,
                       freq_shift: float = 0.0) -> Tensor:
    """``[cos | sin]`` features of ``time_factor * t`` (t: (batch,)), the sinusoid of Vaswani et
    al. 2017 as DDPM uses it, with frequencies ``exp(-ln(max_period) i / (dim / 2 - freq_shift))``.

    FLUX and SD3 read sigma in [0, 1] with ``time_factor`` 1000 and ``freq_shift`` 0; diffusers'
    DiT uses ``freq_shift`` 1 (its ``downscale_freq_shift``); SDXL reads integer timesteps with
    ``time_factor`` 1. The product ``time_factor * t`` is taken in ``t``'s dtype and the result
    has that dtype, as BFL does (pass float32 ``t`` for full precision)."""
    half = dim // 2
    args = (time_factor * t).float()[:, None] * _frequencies(half, max_period, freq_shift, t.device)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.to(t.dtype) if t.is_floating_point() else emb


@torch.compiler.assume_constant_result
def _frequencies(half: int, max_period: float, freq_shift: float, device: torch.device) -> Tensor:
    """The sinusoid's frequencies (float32). A constant to ``torch.compile``: inductor's ``exp`` is
    1 ulp off ATen's, which the time factor 1000 would turn into 5e-5 in the features."""
    arange = torch.arange(half, dtype=torch.float32, device=device)
    return torch.exp(-math.log(max_period) * arange / (half - freq_shift))


def rope(ids: Tensor, axes_dim: tuple[int, ...], theta: float) -> Tensor:
    """Rotary position embedding (RoFormer, Su et al. 2021) for positions ``ids`` (..., tokens,
    axes): complex64 unit rotations (..., tokens, head_dim / 2). Axis ``i`` owns ``axes_dim[i]``
    consecutive channels of each head, whose pair ``k`` turns by ``pos / theta^(2k / axes_dim[i])``.
    Angles in float64 (float32 on MPS, which has none): large positions keep their phase."""
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"position ids have {ids.shape[-1]} axes, the RoPE has {len(axes_dim)} "
                         f"(axes_dim={tuple(axes_dim)})")
    f64 = torch.float64 if ids.device.type != "mps" else torch.float32
    angles = []
    for i, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=f64, device=ids.device) / dim)
        angles.append(ids[..., i].to(f64)[..., None] * omega)
    angle = torch.cat(angles, dim=-1)
    return torch.polar(torch.ones_like(angle), angle).to(torch.complex64)


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate the adjacent channel pairs ``(x[2k], x[2k+1])`` of ``x`` (..., head_dim) by ``pe``
    (complex, broadcastable to (..., head_dim / 2)): one complex multiply per pair, in float32,
    the same arithmetic as BFL's 2x2 rotation matrices and diffusers' cos / sin tables. A bf16 /
    fp16 ``x`` is rotated in place in its float32 copy: one float32 tensor the size of ``x`` the
    fewer at once (the attention's inputs are an eager forward's peak)."""
    pairs = torch.view_as_complex(rearrange(x.float(), "... (d two) -> ... d two", two=2).contiguous())
    in_place = x.dtype != torch.float32 and torch.broadcast_shapes(pairs.shape, pe.shape) == pairs.shape
    rotated = pairs.mul_(pe) if in_place else pairs * pe
    return rearrange(torch.view_as_real(rotated), "... d two -> ... (d two)").type_as(x)


class EmbedND(nn.Module):
    """RoPE tables for n-axis positions, once per forward: ids (batch, tokens, axes) ->
    (batch, 1, tokens, head_dim / 2), broadcast over the heads of (batch, heads, tokens, head_dim)
    queries and keys. FLUX.1: axes (16, 56, 56) over [t, row, col], theta 10000; FLUX.2: (32, 32,
    32, 32) over [t, row, col, text index], theta 2000."""

    def __init__(self, axes_dim: tuple[int, ...], theta: float):
        super().__init__()
        self.axes_dim, self.theta = tuple(axes_dim), theta

    def forward(self, ids: Tensor) -> Tensor:
        return rope(ids, self.axes_dim, self.theta)[:, None]


class MLPEmbedder(nn.Module):
    """``Linear -> SiLU -> Linear``: timestep, guidance and pooled-text features to the hidden size
    (BFL's keys ``in_layer`` / ``out_layer``)."""

    def __init__(self, in_dim: int, hidden_dim: int, *, bias: bool = True):
        super().__init__()
        self.in_layer = Linear(in_dim, hidden_dim, bias=bias)
        self.silu = nn.SiLU()
        self.out_layer = Linear(hidden_dim, hidden_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))
