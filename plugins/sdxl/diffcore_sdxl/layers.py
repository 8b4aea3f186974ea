"""SDXL UNet building blocks, in the layout of Stability's checkpoints (``generative-models``,
``sgm/modules/diffusionmodules/openaimodel.py`` and ``sgm/modules/attention.py``): parameter
names here are the original file's keys.

Every softmax(qk)v goes through ``diffcore.api.Attention``: each SpatialTransformer owns one op
for the self-attention of all its blocks (so guidance patches a whole transformer by its name,
as diffusers' PAG does with ``down_blocks.2.attentions.1``) and each block owns one for its
cross-attention over the text.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffcore.api import (Attention, Conv2d, Linear, activated_linear, conv_plus, fresh_gelu, linear, linear_plus,
                          linear_times, onednn_matmul, plain, timestep_embedding)


def timestep_sinusoid(t: Tensor, dim: int) -> Tensor:
    """[cos | sin] float32 sinusoid of integer-scale ``t`` (DDPM timesteps, micro-conditioning
    scalars): SGM's ``timestep_embedding``, diffusers' ``flip_sin_to_cos=True, freq_shift=0``."""
    return timestep_embedding(t.float(), dim, time_factor=1.0)


def group_norm(channels: int, groups: int, eps: float = 1e-5) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} GroupNorm groups")
    return nn.GroupNorm(groups, channels, eps=eps)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; plus the projected embedding; GroupNorm, SiLU, conv; residual
    (a 1x1 conv where the width changes). No scale-shift norm in SDXL."""

    def __init__(self, channels: int, out_channels: int, emb_dim: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(channels, groups), nn.SiLU(),
                                       Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(group_norm(out_channels, groups), nn.SiLU(), nn.Dropout(0.0),
                                        Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # both sums go into the convolutions where oneDNN runs them (diffcore.nn.conv)
        norm, act, conv = self.in_layers
        h = conv_plus(conv, act(norm(x)), self.emb_layers(emb)[:, :, None, None])
        norm, act, dropout, conv = self.out_layers
        return conv_plus(conv, dropout(act(norm(h))), self.skip_connection(x))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour to the skip connection's size (twice, unless the input was odd), then a conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        up = F.interpolate(x, size=size, mode="nearest") if size is not None else \
            F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(up)


class CrossAttention(nn.Module):
    """q from the image tokens, k and v from ``context`` (the tokens themselves for self-attention);
    no biases on q, k, v. The softmax is ``attend``: the block's own op, or its transformer's."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, own_op: bool = False):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(context_dim, dim, bias=False)
        self.to_v = Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(Linear(dim, dim), nn.Dropout(0.0))
        self.attend = Attention() if own_op else None

    def forward(self, x: Tensor, context: Tensor | None = None, attend: Attention | None = None,
                residual: Tensor | None = None) -> Tensor:
        """The attention's output, plus ``residual`` (summed inside the output matmul) when given."""
        context = x if context is None else context
        q, k, v = (rearrange(t, "B L (H D) -> B H L D", H=self.heads)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = rearrange((attend or self.attend)(q, k, v), "B H L D -> B L (H D)")
        return self.to_out(out) if residual is None else linear_plus(self.to_out[0], out, residual)


class GEGLU(nn.Module):
    """``proj`` gives [x | gate]; the output is ``x * gelu(gate)`` (Shazeer 2020)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = Linear(dim, 2 * inner)

    def forward(self, x: Tensor) -> Tensor:
        # one matmul, as the reference: the split of FeedForward's oneDNN path rounds differently
        # (1e-6 per UNet call, 4e-5 after a 4-step CFG run), so it is never taken on F.linear
        return geglu(self.proj(x))


def geglu(projected: Tensor, in_place: bool = False) -> Tensor:
    """``in_place``: the gate half's GELU overwrites it where autograd does not need it (only for a
    projection nothing else holds)."""
    h, gate = projected.chunk(2, dim=-1)
    return h * (fresh_gelu(gate) if in_place else F.gelu(gate))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(0.0), Linear(mult * dim, dim))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """The MLP's output, plus ``residual`` when given."""
        geglu_layer, _, out = self.net   # the middle is a zero-rate dropout: the identity
        proj = geglu_layer.proj
        if plain(proj) and plain(out) and onednn_matmul(x, proj.weight, proj.bias):
            # oneDNN: the GELU and the gate's product go into two half-width matmuls, the residual
            # into the last (three passes over the 4x-wide hidden state fewer)
            (w_x, w_gate), (b_x, b_gate) = proj.weight.chunk(2), proj.bias.chunk(2)
            h = linear_times(x, w_x, b_x, linear(x, w_gate, b_gate, "gelu"))
            return linear(h, out.weight, out.bias) if residual is None else linear_plus(out, h, residual)
        if plain(proj) and plain(out):   # no hook keeps the projection: its gate is activated in place
            y = out(geglu(proj(x), in_place=True))
        else:            # under a LoRA on the output layer, the GEGLU's output is recomputed in backward
            y = activated_linear(out, [(proj(x), geglu)])
        return y if residual is None else residual + y


class BasicTransformerBlock(nn.Module):
    """LN -> self-attention, LN -> cross-attention over the text, LN -> GEGLU MLP; each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, context_dim, own_op=True)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, self_attend: Attention) -> Tensor:
        x = self.attn1(self.norm1(x), attend=self_attend, residual=x)
        x = self.attn2(self.norm2(x), context, residual=x)
        return self.ff(self.norm3(x), residual=x)


class SpatialTransformer(nn.Module):
    """GroupNorm, linear ``proj_in`` to tokens, ``depth`` transformer blocks, linear ``proj_out``,
    residual (SDXL's ``use_linear_in_transformer``)."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int):
        super().__init__()
        self.attend = Attention()   # the self-attention op of every block below
        self.norm = group_norm(channels, groups, eps=1e-6)
        self.proj_in = Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = Linear(channels, channels)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        tokens = self.proj_in(rearrange(self.norm(x), "B C H W -> B (H W) C"))
        for block in self.transformer_blocks:
            tokens = block(tokens, context, self.attend)
        return x + rearrange(self.proj_out(tokens), "B (H W) C -> B C H W", H=h, W=w)
