"""FLUX.1 building blocks, in the layout of BFL's checkpoints (github.com/black-forest-labs/flux,
``src/flux/modules/layers.py``): parameter names here are the checkpoint's keys.

Every softmax(qk)v goes through ``diffcore.nn.attention.Attention`` (the ``attend`` child of a
block), so guidance can patch a block's attention by its name (``double_blocks.3``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffcore.api import (
    Attention,
    GeluMLP,
    Linear,
    Modulation,
    QKNorm,
    SelfAttention,
    apply_rope,
    layer_norm,
    linear,
    plain,
)


class DoubleStreamBlock(nn.Module):
    """MMDiT block: image and text keep their own weights and attend jointly over [txt, img]."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(hidden * mlp_ratio)
        self.img_mod = Modulation(hidden, double=True)
        self.img_norm1 = layer_norm(hidden)
        self.img_attn = SelfAttention(hidden, num_heads, qkv_bias=qkv_bias)
        self.img_norm2 = layer_norm(hidden)
        self.img_mlp = GeluMLP(hidden, mlp_hidden)
        self.txt_mod = Modulation(hidden, double=True)
        self.txt_norm1 = layer_norm(hidden)
        self.txt_attn = SelfAttention(hidden, num_heads, qkv_bias=qkv_bias)
        self.txt_norm2 = layer_norm(hidden)
        self.txt_mlp = GeluMLP(hidden, mlp_hidden)
        self.attend = Attention()

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
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
        self.pre_norm = layer_norm(hidden)
        self.modulation = Modulation(hidden, double=False)
        self.attend = Attention()

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        (mod,) = self.modulation(vec)
        qkv, mlp = self.project_in(mod.modulate(self.pre_norm(x)))
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k)
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
