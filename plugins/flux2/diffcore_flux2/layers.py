"""FLUX.2 transformer layers (after BFL's flux2 ``model.py``), in BFL's checkpoint layout.

What changed from FLUX.1: no biases anywhere; a SwiGLU MLP whose input projection is fused
[gate | up]; and the adaLN modulation is computed once per forward from the timestep (+ guidance)
embedding and shared by every block, so blocks hold no modulation weights. The softmax part of
each joint attention is a diffcore ``Attention`` child named ``attn``, which gives the layer its
name (``double_blocks.3``, ``single_blocks.10``) for attention patches.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffcore.api import Attention, Linear, ModulationOut, QKNorm, SelfAttention, apply_rope, layer_norm, linear, plain


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


def joint_attention(attn: Attention, q: Tensor, k: Tensor, v: Tensor, refs: ReferenceSpan | None = None) -> Tensor:
    """``attn`` over (batch, heads, tokens, head_dim) q, k, v (``refs`` splices the cached
    reference keys and values in) -> (batch, tokens, hidden)."""
    mask = None
    if refs is not None:
        k, v, mask = refs(k, v)
    return rearrange(attn(q, k, v, mask), "b h l d -> b l (h d)")


class SwiGLU(nn.Module):
    """silu(gate) * up over the two halves of a fused [gate | up] projection (Shazeer 2020)."""

    def forward(self, x: Tensor) -> Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def swiglu_mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    return nn.Sequential(Linear(hidden, 2 * mlp_hidden, bias=False), SwiGLU(),
                         Linear(mlp_hidden, hidden, bias=False))


class DoubleStreamBlock(nn.Module):
    """Separate image and text weights, one attention over the sequence [txt, img]."""

    def __init__(self, hidden: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.img_norm1, self.img_norm2 = layer_norm(hidden), layer_norm(hidden)
        self.img_attn = SelfAttention(hidden, heads, qkv_bias=False, proj_bias=False)
        self.img_mlp = swiglu_mlp(hidden, mlp_hidden)
        self.txt_norm1, self.txt_norm2 = layer_norm(hidden), layer_norm(hidden)
        self.txt_attn = SelfAttention(hidden, heads, qkv_bias=False, proj_bias=False)
        self.txt_mlp = swiglu_mlp(hidden, mlp_hidden)
        self.attn = Attention()

    def forward(self, img: Tensor, txt: Tensor, pe: Tensor, img_mod: list[ModulationOut],
                txt_mod: list[ModulationOut], refs: ReferenceSpan | None = None) -> tuple[Tensor, Tensor]:
        (img_mod1, img_mod2), (txt_mod1, txt_mod2) = img_mod, txt_mod
        img_q, img_k, img_v = self.img_attn.heads(img_mod1.modulate(self.img_norm1(img)))
        txt_q, txt_k, txt_v = self.txt_attn.heads(txt_mod1.modulate(self.txt_norm1(txt)))
        q = apply_rope(torch.cat((txt_q, img_q), dim=2), pe)
        k = apply_rope(torch.cat((txt_k, img_k), dim=2), pe)
        out = joint_attention(self.attn, q, k, torch.cat((txt_v, img_v), dim=2), refs)
        txt_out, img_out = out[:, :txt.shape[1]], out[:, txt.shape[1]:]

        img = img_mod1.residual(img, self.img_attn.proj(img_out))
        img = img_mod2.residual(img, self.img_mlp(img_mod2.modulate(self.img_norm2(img))))
        txt = txt_mod1.residual(txt, self.txt_attn.proj(txt_out))
        txt = txt_mod2.residual(txt, self.txt_mlp(txt_mod2.modulate(self.txt_norm2(txt))))
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

    def forward(self, x: Tensor, pe: Tensor, mod: ModulationOut, keep: slice | None = None,
                refs: ReferenceSpan | None = None) -> Tensor:
        h = mod.modulate(self.pre_norm(x))
        sizes = [3 * self.hidden, 2 * self.mlp_hidden]
        if keep is not None and plain(self.linear1):  # the MLP half of linear1 for the kept tokens only
            qkv_weight, mlp_weight = self.linear1.weight.split(sizes)
            qkv, mlp = linear(h, qkv_weight), linear(h[:, keep], mlp_weight)
        else:  # a hooked or adapter-wrapped linear1 must run as a module
            qkv, mlp = self.linear1(h).split(sizes, dim=-1)
            mlp = mlp if keep is None else mlp[:, keep]
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.heads)
        q, k = self.norm(q, k)
        attn = joint_attention(self.attn, apply_rope(q, pe), apply_rope(k, pe), v, refs)
        if keep is not None:
            x, attn = x[:, keep], attn[:, keep]
            if mod.gate.shape[1] != 1:  # per-token modulation (reference cache)
                mod = mod._replace(gate=mod.gate[:, keep])
        return mod.residual(x, self.linear2(torch.cat([attn, self.mlp_act(mlp)], dim=-1)))
