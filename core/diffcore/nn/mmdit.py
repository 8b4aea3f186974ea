"""Pieces of adaLN transformers with joint attention (SD3's MMDiT, Esser et al. 2024; FLUX.1 and
FLUX.2): one stream's attention projections, adaLN modulation, and the final layer.

Parameter names are BFL's checkpoint keys (``qkv``, ``norm.query_norm.scale``, ``proj``,
``lin``, ``adaLN_modulation.1``), so a family in that layout loads its files without renaming.

Two arithmetics of the modulation exist, and a family keeps the one its numbers were checked
with: ``(1 + scale) * x + shift`` as BFL and diffusers write it, or the same in one fused
multiply-add (``torch.addcmul``: one kernel, one rounding; FLUX.2 here). They differ in the last
bit, so the choice is a constructor argument (``fused``), never a silent change.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffcore.nn.linear import Linear
from diffcore.nn.norms import QKNorm, layer_norm

__all__ = ["FusedModulationOut", "LastLayer", "Modulation", "ModulationOut", "SelfAttention", "modulate"]


def modulate(x: Tensor, shift: Tensor, scale: Tensor, *, fused: bool = False) -> Tensor:
    """adaLN: ``(1 + scale) * x + shift``; with ``fused``, as one multiply-add."""
    return torch.addcmul(shift, x, 1 + scale) if fused else (1 + scale) * x + shift


class ModulationOut(NamedTuple):
    """One (shift, scale, gate) set, each (batch, 1 or tokens, hidden)."""

    shift: Tensor
    scale: Tensor
    gate: Tensor

    def modulate(self, x: Tensor) -> Tensor:
        """adaLN: (1 + scale) * x + shift."""
        return modulate(x, self.shift, self.scale)

    def residual(self, x: Tensor, update: Tensor) -> Tensor:
        """The gated residual: x + gate * update."""
        return x + self.gate * update


class FusedModulationOut(ModulationOut):
    """``ModulationOut`` whose two operations are single fused multiply-adds."""

    __slots__ = ()

    def modulate(self, x: Tensor) -> Tensor:
        return modulate(x, self.shift, self.scale, fused=True)

    def residual(self, x: Tensor, update: Tensor) -> Tensor:
        return torch.addcmul(x, self.gate, update)


class Modulation(nn.Module):
    """adaLN from the conditioning vector: ``lin(silu(vec))`` cut into one (shift, scale, gate)
    set, or two for a double block (attention, then MLP). FLUX.1 has one per block; FLUX.2 one
    per kind of block, shared by all of them."""

    def __init__(self, dim: int, double: bool, *, bias: bool = True, fused: bool = False):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.out = FusedModulationOut if fused else ModulationOut
        self.lin = Linear(dim, self.multiplier * dim, bias=bias)

    def forward(self, vec: Tensor) -> list[ModulationOut]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return [self.out(*out[i:i + 3]) for i in range(0, self.multiplier, 3)]


class SelfAttention(nn.Module):
    """One stream's projections around an attention: fused ``qkv``, per-head QK-norm, output
    ``proj``. The softmax belongs to the block (joint attention spans both streams)."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = Linear(dim, dim, bias=proj_bias)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(batch, tokens, dim) -> normalised q, k and v, each (batch, heads, tokens, head_dim)."""
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k)
        return q, k, v


class LastLayer(nn.Module):
    """adaLN then the projection to the output channels. The modulation is stored (shift, scale),
    BFL's and SD3's order; diffusers' ``AdaLayerNormContinuous`` stores (scale, shift), so key
    converters swap the halves (``diffcore.nn.keys.swap_halves``)."""

    def __init__(self, hidden: int, out_channels: int, *, bias: bool = True, fused: bool = False):
        super().__init__()
        self.fused = fused
        self.norm_final = layer_norm(hidden)
        self.linear = Linear(hidden, out_channels, bias=bias)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden, 2 * hidden, bias=bias))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale, fused=self.fused))
