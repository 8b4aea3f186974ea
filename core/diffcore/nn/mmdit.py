"""Pieces of adaLN transformers with joint attention (SD3's MMDiT, Esser et al. 2024; FLUX.1 and
FLUX.2): one stream's attention projections, adaLN modulation, the final layer, and FLUX's
double-stream and single-stream blocks, whose variants differ only in constructor arguments
(MLP, biases, where the modulation comes from).

Parameter names are BFL's checkpoint keys (``qkv``, ``norm.query_norm.scale``, ``proj``,
``lin``, ``adaLN_modulation.1``), so a family in that layout loads its files without renaming.

Two arithmetics of the modulation exist, and a family keeps the one its numbers were checked
with: ``(1 + scale) * x + shift`` as BFL and diffusers write it, or the same in one fused
multiply-add (``torch.addcmul``: one kernel, one rounding; FLUX.2 here). They differ in the last
bit, so the choice is a constructor argument (``fused``), never a silent change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffcore.nn.attention import Attention
from diffcore.nn.linear import Linear, linear, plain
from diffcore.nn.lora_linear import Activation, activated_linear
from diffcore.nn.norms import QKNorm, layer_norm
from diffcore.nn.qk_norm_rope import Stream, attention_heads

__all__ = ["DoubleStreamBlock", "FusedModulationOut", "LastLayer", "Modulation", "ModulationOut", "SelfAttention",
           "SingleStreamBlock", "SwiGLU", "SwiGLUMLP", "modulate", "swiglu", "swiglu_mlp"]

# kv(k, v) -> (k, v, mask): a hook that may change a block's keys and values and add an attention
# mask (True = may attend) before the softmax; FLUX.2 klein-9b-kv's reference cache is one
KVHook = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor, Tensor | None]"]


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

    def stream(self, x: Tensor) -> Stream:
        """(batch, tokens, dim) -> this stream's part of a joint attention (``attention_heads``)."""
        return self.qkv(x), self.norm.query_norm, self.norm.key_norm

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(batch, tokens, dim) -> normalised q, k and v, each (batch, heads, tokens, head_dim)."""
        return attention_heads([self.stream(x)], self.num_heads)


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


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def swiglu(x: Tensor) -> Tensor:
    """silu(gate) * up over the two halves of a fused [gate | up] projection (Shazeer 2020)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """``swiglu`` as a module (the middle of ``swiglu_mlp``)."""

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x)


class SwiGLUMLP(nn.Sequential):
    """``Linear(hidden, 2 * mlp_hidden) -> SwiGLU -> Linear(mlp_hidden, hidden)``, keys ``0.*`` / ``2.*``;
    under a LoRA on the second, the SwiGLU's output is recomputed in backward (``diffcore.nn.lora_linear``)."""

    def __init__(self, hidden: int, mlp_hidden: int, *, bias: bool = False):
        super().__init__(Linear(hidden, 2 * mlp_hidden, bias=bias), SwiGLU(), Linear(mlp_hidden, hidden, bias=bias))

    def forward(self, x: Tensor) -> Tensor:
        up, _, down = self
        return activated_linear(down, [(up(x), swiglu)])


def swiglu_mlp(hidden: int, mlp_hidden: int, *, bias: bool = False) -> SwiGLUMLP:
    """FLUX.2's MLP (``SwiGLUMLP``)."""
    return SwiGLUMLP(hidden, mlp_hidden, bias=bias)


def _attend(attend: Attention, q: Tensor, k: Tensor, v: Tensor, kv: KVHook | None) -> Tensor:
    """(batch, heads, tokens, head_dim) q, k, v -> (batch, tokens, heads * head_dim)."""
    mask = None
    if kv is not None:
        k, v, mask = kv(k, v)
    return rearrange(attend(q, k, v, mask), "B H L D -> B L (H D)")


class DoubleStreamBlock(nn.Module):
    """MMDiT block: image and text keep their own weights and attend jointly over [txt, img].

    ``mlp()`` builds each stream's MLP (FLUX.1: ``GeluMLP``, FLUX.2: ``swiglu_mlp``). With
    ``modulation`` the block owns its adaLN (``img_mod`` / ``txt_mod``, FLUX.1); without, the
    caller passes ``mods`` = (img sets, txt sets), computed once for every block (FLUX.2). The
    softmax is the ``attend`` child, which names the layer (``double_blocks.3``) for patches."""

    def __init__(self, hidden: int, num_heads: int, mlp: Callable[[], nn.Module], *, qkv_bias: bool = True,
                 bias: bool = True, modulation: bool = True, fused: bool = False):
        super().__init__()
        if modulation:
            self.img_mod = Modulation(hidden, double=True, bias=bias, fused=fused)
            self.txt_mod = Modulation(hidden, double=True, bias=bias, fused=fused)
        self.img_norm1, self.img_norm2 = layer_norm(hidden), layer_norm(hidden)
        self.img_attn = SelfAttention(hidden, num_heads, qkv_bias=qkv_bias, proj_bias=bias)
        self.img_mlp = mlp()
        self.txt_norm1, self.txt_norm2 = layer_norm(hidden), layer_norm(hidden)
        self.txt_attn = SelfAttention(hidden, num_heads, qkv_bias=qkv_bias, proj_bias=bias)
        self.txt_mlp = mlp()
        self.attend = Attention()

    def forward(self, img: Tensor, txt: Tensor, pe: Tensor, vec: Tensor | None = None,
                mods: tuple[list[ModulationOut], list[ModulationOut]] | None = None,
                kv: KVHook | None = None) -> tuple[Tensor, Tensor]:
        (img_mod1, img_mod2), (txt_mod1, txt_mod2) = mods or (self.img_mod(vec), self.txt_mod(vec))
        txt_attn, img_attn = self._attention(img, txt, pe, img_mod1, txt_mod1, kv)
        img = img_mod1.residual(img, self.img_attn.proj(img_attn))
        img = img_mod2.residual(img, self.img_mlp(img_mod2.modulate(self.img_norm2(img))))
        txt = txt_mod1.residual(txt, self.txt_attn.proj(txt_attn))
        txt = txt_mod2.residual(txt, self.txt_mlp(txt_mod2.modulate(self.txt_norm2(txt))))
        return img, txt

    def _attention(self, img: Tensor, txt: Tensor, pe: Tensor, img_mod: ModulationOut, txt_mod: ModulationOut,
                   kv: KVHook | None) -> tuple[Tensor, Tensor]:
        """The joint attention's output at the text and at the image tokens. A method of its own
        so that its q, k and v are freed on return, before the MLPs make the block's widest
        tensors: locals would hold them to the end of ``forward`` (the peak of an eager forward)."""
        img_part = self.img_attn.stream(img_mod.modulate(self.img_norm1(img)))
        txt_part = self.txt_attn.stream(txt_mod.modulate(self.txt_norm1(txt)))
        attn = _attend(self.attend, *attention_heads([txt_part, img_part], self.img_attn.num_heads, pe), kv)
        return attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint sequence (Dehghani et al. 2023, ViT-22B): one
    ``linear1`` gives [q | k | v | mlp_in], one ``linear2`` maps [attention | act(mlp_in)] back.

    ``mlp_act``: ``"gelu_tanh"`` (FLUX.1) or ``"swiglu"`` (FLUX.2, whose mlp_in is [gate | up]);
    ``modulation`` as for ``DoubleStreamBlock`` (without it, pass ``mod``). ``keep``: the tokens
    whose output is used (the last block's image tokens): the others still give keys and values,
    but their MLP and output projection are skipped and only the kept tokens are returned."""

    def __init__(self, hidden: int, num_heads: int, mlp_hidden: int, *, mlp_act: str = "gelu_tanh",
                 bias: bool = True, modulation: bool = True, fused: bool = False):
        super().__init__()
        if mlp_act not in ("gelu_tanh", "swiglu"):
            raise ValueError(f"mlp_act must be gelu_tanh or swiglu, got {mlp_act!r}")
        self.hidden, self.num_heads, self.mlp_act = hidden, num_heads, mlp_act
        self.mlp_in = mlp_hidden * (2 if mlp_act == "swiglu" else 1)
        self.linear1 = Linear(hidden, 3 * hidden + self.mlp_in, bias=bias)
        self.linear2 = Linear(hidden + mlp_hidden, hidden, bias=bias)
        self.norm = QKNorm(hidden // num_heads)
        self.pre_norm = layer_norm(hidden)
        if modulation:
            self.modulation = Modulation(hidden, double=False, bias=bias, fused=fused)
        self.attend = Attention()

    def forward(self, x: Tensor, pe: Tensor, vec: Tensor | None = None, mod: ModulationOut | None = None,
                keep: slice | None = None, kv: KVHook | None = None) -> Tensor:
        mod = mod or self.modulation(vec)[0]
        attn, mlp, act = self._attention(mod.modulate(self.pre_norm(x)), pe, keep, kv)
        if isinstance(keep, slice):
            x, attn = x[:, keep], attn[:, keep]
            if mod.gate.shape[1] != 1:  # per-token modulation
                mod = mod._replace(gate=mod.gate[:, keep])
        return mod.residual(x, activated_linear(self.linear2, [(attn, None), (mlp, act)]))

    def _attention(self, x: Tensor, pe: Tensor, keep: slice | None, kv: KVHook | None
                   ) -> tuple[Tensor, Tensor, Activation]:
        """``linear1`` and the attention -> (attention output, MLP input of the kept tokens, the
        activation still to apply to it).

        When ``linear1`` is plain, as two matmuls on row blocks of its weight: the MLP half runs
        after the attention, whose q, k, v are freed by then (an eager forward's peak memory is
        here), only the kept tokens go through it, and a GELU runs inside it (oneDNN's post-op, or
        in place). Otherwise ``linear1`` runs as a module (a hook or an adapter on it). A SwiGLU
        is left to ``linear2`` (``activated_linear``), which under a LoRA keeps its input alone
        for the backward pass."""
        sizes = [3 * self.hidden, self.mlp_in]
        gelu = self.mlp_act == "gelu_tanh"
        # isinstance, never ``keep is None``: torch.compile turns a slice of symbolic sizes compared
        # with None into constants, so each new resolution would compile the network again
        kept = isinstance(keep, slice)
        if plain(self.linear1):
            w_qkv, w_mlp = self.linear1.weight.split(sizes)
            b_qkv, b_mlp = self.linear1.bias.split(sizes) if self.linear1.bias is not None else (None, None)
            attn = self._qkv_attention(linear(x, w_qkv, b_qkv), pe, kv)
            mlp = linear(x[:, keep] if kept else x, w_mlp, b_mlp, "gelu_tanh" if gelu else None)
            return attn, mlp, None if gelu else swiglu
        qkv, mlp = self.linear1(x).split(sizes, dim=-1)  # a hooked or adapter-wrapped linear1 runs as a module
        return self._qkv_attention(qkv, pe, kv), mlp[:, keep] if kept else mlp, _gelu_tanh if gelu else swiglu

    def _qkv_attention(self, qkv: Tensor, pe: Tensor, kv: KVHook | None) -> Tensor:
        """softmax(qk)v of the projection ``qkv``; its q, k, v are freed on return."""
        q, k, v = attention_heads([(qkv, self.norm.query_norm, self.norm.key_norm)], self.num_heads, pe)
        return _attend(self.attend, q, k, v, kv)
