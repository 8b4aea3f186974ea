"""FLUX.2 transformer layers (after BFL's flux2 ``model.py``), in BFL's checkpoint layout.

What changed from FLUX.1: no biases anywhere; a SwiGLU MLP whose input projection is fused
[gate | up]; and the adaLN modulation is computed once per forward from the timestep (+ guidance)
embedding and shared by every block, so blocks hold no modulation weights. The softmax part of
each joint attention is a diffcore ``Attention`` child named ``attn``, which gives the layer its
name (``double_blocks.3``, ``single_blocks.10``) for attention patches.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffcore.api import Attention, Linear, linear, plain

TIME_DIM = 256
Mod = tuple[Tensor, Tensor, Tensor]  # shift, scale, gate: each (batch, 1, hidden)


def timestep_embedding(t: Tensor, dim: int = TIME_DIM, max_period: float = 10000.0,
                       time_factor: float = 1000.0) -> Tensor:
    """cos | sin features of ``time_factor * t`` (the DDPM sinusoid, cos half first as in BFL)."""
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Unit complex rotations (..., n, dim/2) for positions (..., n) (RoFormer, Su et al. 2021):
    feature pair ``i`` turns by ``pos / theta^(2i/dim)``. Angles in float64 (float32 on MPS) so
    large positions keep their phase."""
    f64 = torch.float64 if pos.device.type != "mps" else torch.float32
    scale = torch.arange(0, dim, 2, dtype=f64, device=pos.device) / dim
    angles = pos.to(f64)[..., None] * (1.0 / theta**scale)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate adjacent feature pairs of ``x`` (batch, tokens, ..., head_dim) by ``pe`` (batch, tokens,
    head_dim/2), in float32: each pair is a complex number, so the rotation is one complex multiply
    (BFL FLUX.1's ``freqs_cis``), the same arithmetic as the 2x2 matrices and diffusers' cos/sin."""
    pairs = torch.view_as_complex(rearrange(x.float(), "... (d two) -> ... d two", two=2).contiguous())
    pe = pe.reshape(*pe.shape[:2], *(1,) * (x.ndim - 3), pe.shape[-1])
    return rearrange(torch.view_as_real(pairs * pe), "... d two -> ... (d two)").type_as(x)


@attrs.define(eq=False)
class ReferenceCache:
    """Every attention layer's keys and values of the reference tokens, kept from the first
    forward that sees them (FLUX.2 klein-9b-kv): later forwards splice them in after the text
    instead of running the references through the model again. The references attend only to
    each other, at a fixed timestep, so their keys and values are the same at every step.
    One per generation (and per guidance branch); ``clear()`` empties it."""

    kv: dict[str, tuple[Tensor, Tensor]] = attrs.field(factory=dict)

    @property
    def filled(self) -> bool:
        return bool(self.kv)

    def clear(self) -> None:
        self.kv.clear()


@attrs.frozen
class ReferenceSpan:
    """One layer's view of a ``ReferenceCache`` in one forward. Its sequence starts with ``txt``
    text tokens. Filling (``mask`` given): ``refs`` reference tokens follow the text; their keys
    and values are stored and ``mask`` (True = may attend) keeps them attending to each other
    only. Reading (``mask`` None): the stored keys and values are spliced in after the text."""

    cache: ReferenceCache
    layer: str
    txt: int
    refs: int = 0
    mask: Tensor | None = None

    def __call__(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """k, v (batch, heads, tokens, head_dim) -> the keys, values and mask to attend with."""
        if self.mask is not None:
            span = slice(self.txt, self.txt + self.refs)
            self.cache.kv[self.layer] = (k[:, :, span].clone(), v[:, :, span].clone())
            return k, v, self.mask
        k_ref, v_ref = self.cache.kv[self.layer]
        if k_ref.shape[0] != k.shape[0]:
            raise ValueError(f"the reference cache was filled for a batch of {k_ref.shape[0]}, this forward has "
                             f"{k.shape[0]}: use one cache per batch layout")
        txt = self.txt
        return (torch.cat([k[:, :, :txt], k_ref, k[:, :, txt:]], dim=2),
                torch.cat([v[:, :, :txt], v_ref, v[:, :, txt:]], dim=2), None)


def joint_attention(attn: Attention, qk: Tensor, v: Tensor, refs: ReferenceSpan | None = None) -> Tensor:
    """``attn`` over token-major [q, k] (batch, tokens, 2, heads, head_dim) and v (batch, tokens, heads,
    head_dim), seen by ``attn`` (and any patch on it) as (batch, heads, tokens, head_dim) -> (batch, tokens, hidden)."""
    q, k = rearrange(qk, "b l two h d -> two b h l d")
    v, mask = rearrange(v, "b l h d -> b h l d"), None
    if refs is not None:
        k, v, mask = refs(k, v)
    return rearrange(attn(q, k, v, mask), "b h l d -> b l (h d)")


class EmbedND(nn.Module):
    """RoPE over several position axes: ids (batch, tokens, axes) -> (batch, tokens, head_dim/2)
    complex rotations; axis ``i`` rotates ``axes_dim[i]`` consecutive features of each head."""

    def __init__(self, theta: int, axes_dim: tuple[int, ...]):
        super().__init__()
        self.theta, self.axes_dim = theta, tuple(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.shape[-1] != len(self.axes_dim):
            raise ValueError(f"position ids have {ids.shape[-1]} axes, the model's RoPE has {len(self.axes_dim)} "
                             f"({self.axes_dim}); FLUX.2 ids are [t, h, w, l]")
        return torch.cat([rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = Linear(in_dim, hidden, bias=False)
        self.out_layer = Linear(hidden, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.scale)

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), self.scale.shape, self.scale.float(), self.eps).type_as(x)


class QKNorm(nn.Module):
    """Per-head RMSNorm of queries and keys (Dehghani et al. 2023), learnable scales, applied to
    both in one pass: ``qk`` is (..., 2, heads, head_dim), queries at index 0, keys at 1."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, qk: Tensor) -> Tensor:
        scale = rearrange([self.query_norm.scale, self.key_norm.scale], "two d -> two 1 d").float()
        return (F.rms_norm(qk.float(), scale.shape[-1:], None, self.query_norm.eps) * scale).type_as(qk)


class SwiGLU(nn.Module):
    """silu(gate) * up over the two halves of a fused [gate | up] projection (Shazeer 2020)."""

    def forward(self, x: Tensor) -> Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def swiglu_mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    return nn.Sequential(Linear(hidden, 2 * mlp_hidden, bias=False), SwiGLU(),
                         Linear(mlp_hidden, hidden, bias=False))


def layer_norm(hidden: int) -> nn.LayerNorm:
    return nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``(1 + scale) * x + shift`` as one fused multiply-add."""
    return torch.addcmul(shift, x, 1 + scale)


def gated(x: Tensor, gate: Tensor, update: Tensor) -> Tensor:
    """The gated residual ``x + gate * update`` as one fused multiply-add."""
    return torch.addcmul(x, gate, update)


class Modulation(nn.Module):
    """``sets`` (shift, scale, gate) triples from the conditioning vector; one instance serves all blocks."""

    def __init__(self, hidden: int, sets: int):
        super().__init__()
        self.sets = sets
        self.lin = Linear(hidden, 3 * sets * hidden, bias=False)

    def forward(self, vec: Tensor) -> tuple[Mod, ...]:
        out = rearrange(self.lin(F.silu(vec)), "b (s three d) -> s three b 1 d", s=self.sets, three=3)
        return tuple((m[0], m[1], m[2]) for m in out)


class StreamAttention(nn.Module):
    """One stream's projections around the joint attention: fused qkv with QK-norm in, ``proj`` out."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(hidden, 3 * hidden, bias=False)
        self.norm = QKNorm(hidden // heads)
        self.proj = Linear(hidden, hidden, bias=False)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised [q, k] (batch, tokens, 2, heads, head_dim) and v (batch, tokens, heads, head_dim)."""
        qkv = rearrange(self.qkv(x), "b l (three h d) -> b l three h d", three=3, h=self.heads)
        return self.norm(qkv[:, :, :2]), qkv[:, :, 2]


class DoubleStreamBlock(nn.Module):
    """Separate image and text weights, one attention over the sequence [txt, img]."""

    def __init__(self, hidden: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.img_norm1, self.img_norm2 = layer_norm(hidden), layer_norm(hidden)
        self.img_attn = StreamAttention(hidden, heads)
        self.img_mlp = swiglu_mlp(hidden, mlp_hidden)
        self.txt_norm1, self.txt_norm2 = layer_norm(hidden), layer_norm(hidden)
        self.txt_attn = StreamAttention(hidden, heads)
        self.txt_mlp = swiglu_mlp(hidden, mlp_hidden)
        self.attn = Attention()

    def forward(self, img: Tensor, txt: Tensor, pe: Tensor, img_mod: tuple[Mod, Mod], txt_mod: tuple[Mod, Mod],
                refs: ReferenceSpan | None = None) -> tuple[Tensor, Tensor]:
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = img_mod
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = txt_mod
        img_qk, img_v = self.img_attn.project(modulate(self.img_norm1(img), img_shift1, img_scale1))
        txt_qk, txt_v = self.txt_attn.project(modulate(self.txt_norm1(txt), txt_shift1, txt_scale1))
        qk = apply_rope(torch.cat([txt_qk, img_qk], dim=1), pe)
        out = joint_attention(self.attn, qk, torch.cat([txt_v, img_v], dim=1), refs)
        txt_out, img_out = out[:, :txt.shape[1]], out[:, txt.shape[1]:]

        img = gated(img, img_gate1, self.img_attn.proj(img_out))
        img = gated(img, img_gate2, self.img_mlp(modulate(self.img_norm2(img), img_shift2, img_scale2)))
        txt = gated(txt, txt_gate1, self.txt_attn.proj(txt_out))
        txt = gated(txt, txt_gate2, self.txt_mlp(modulate(self.txt_norm2(txt), txt_shift2, txt_scale2)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP (Dehghani et al. 2023): ``linear1`` = [q|k|v|gate|up], ``linear2``
    takes [attention | MLP] back to the hidden size.

    ``keep``: the tokens whose output is used, for the last block, where only the image tokens
    go on to the final layer; the others still give keys and values, but their MLP and output
    projection are skipped and only the kept tokens are returned."""

    def __init__(self, hidden: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.heads, self.hidden, self.mlp_hidden = heads, hidden, mlp_hidden
        self.pre_norm = layer_norm(hidden)
        self.linear1 = Linear(hidden, 3 * hidden + 2 * mlp_hidden, bias=False)
        self.norm = QKNorm(hidden // heads)
        self.mlp_act = SwiGLU()
        self.linear2 = Linear(hidden + mlp_hidden, hidden, bias=False)
        self.attn = Attention()

    def forward(self, x: Tensor, pe: Tensor, mod: Mod, keep: slice | None = None,
                refs: ReferenceSpan | None = None) -> Tensor:
        shift, scale, gate = mod
        h = modulate(self.pre_norm(x), shift, scale)
        sizes = [3 * self.hidden, 2 * self.mlp_hidden]
        if keep is not None and plain(self.linear1):  # the MLP half of linear1 for the kept tokens only
            qkv_weight, mlp_weight = self.linear1.weight.split(sizes)
            qkv, mlp = linear(h, qkv_weight), linear(h[:, keep], mlp_weight)
        else:  # a hooked or adapter-wrapped linear1 must run as a module
            qkv, mlp = self.linear1(h).split(sizes, dim=-1)
            mlp = mlp if keep is None else mlp[:, keep]
        qkv = rearrange(qkv, "b l (three h d) -> b l three h d", three=3, h=self.heads)
        attn = joint_attention(self.attn, apply_rope(self.norm(qkv[:, :, :2]), pe), qkv[:, :, 2], refs)
        if keep is not None:
            x, attn = x[:, keep], attn[:, keep]
            gate = gate if gate.shape[1] == 1 else gate[:, keep]  # per-token modulation (reference cache)
        return gated(x, gate, self.linear2(torch.cat([attn, self.mlp_act(mlp)], dim=-1)))


class LastLayer(nn.Module):
    """adaLN with BFL's (shift, scale) order, then the projection to the latent channels."""

    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm_final = layer_norm(hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden, 2 * hidden, bias=False))
        self.linear = Linear(hidden, out_channels, bias=False)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = rearrange(self.adaLN_modulation(vec), "b (two d) -> two b 1 d", two=2)
        return self.linear(modulate(self.norm_final(x), shift, scale))
