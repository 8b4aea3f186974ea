"""MMDiT building blocks in the layout of Stability's checkpoints (github.com/Stability-AI/sd3.5,
``mmditx.py``): parameter names here are the original keys (``joint_blocks.3.x_block.attn.qkv``).
The core's toolbox gives the modulation triple, the final layer and the timestep sinusoid; its
``SelfAttention`` / ``MLPEmbedder`` / ``RMSNorm`` carry BFL's key names, so SD3's own (``ln_q.weight``,
``mlp.0``, ``mlp.fc1``) are built here.

Every softmax(qk)v goes through ``diffcore.api.Attention``: a joint block's ``attend`` child
(layer ``joint_blocks.N``) and MMDiT-X's image-only ``attn2`` (``joint_blocks.N.x_block.attn2``),
so guidance can patch either by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffcore.api import Attention, Linear, ModulationOut, attention_heads, layer_norm, linear, plain


def sincos_table(dim: int, size: int, base: int) -> Tensor:
    """A ``(size * size, dim)`` 2-D sin-cos table on a grid scaled to ``base`` positions: the
    first half of the channels encodes the column, the second the row, each as [sin | cos]
    (MAE / DiT's layout, diffusers' ``get_2d_sincos_pos_embed``). Only a fresh model's value:
    checkpoints store the table."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos table needs a width divisible by 4, got {dim}")
    pos = torch.arange(size, dtype=torch.float64) * (base / size)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))

    def axis(p: Tensor) -> Tensor:
        angle = p[:, None] * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=-1)

    rows, cols = torch.meshgrid(pos, pos, indexing="ij")
    return torch.cat([axis(cols.reshape(-1)), axis(rows.reshape(-1))], dim=-1).float()


class VectorEmbedder(nn.Module):
    """``Linear -> SiLU -> Linear`` (the timestep's sinusoid, the pooled text)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(Linear(in_dim, hidden), nn.SiLU(), Linear(hidden, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class PatchEmbed(nn.Module):
    """Patchify: a ``patch x patch`` stride-``patch`` conv, then tokens in row-major order."""

    def __init__(self, in_channels: int, hidden: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.proj(x), "B D h w -> B (h w) D")


class Mlp(nn.Module):
    """``fc1 -> GELU(tanh) -> fc2``, the GELU inside fc1's matmul when oneDNN runs it."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        if plain(self.fc1):
            return self.fc2(linear(x, self.fc1.weight, self.fc1.bias, "gelu_tanh"))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """One stream's projections: fused ``qkv`` (with bias), optional RMS ``ln_q`` / ``ln_k`` per
    head, output ``proj`` (absent in the pre-only context stream). The softmax is the caller's."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim)
        self.ln_q = nn.RMSNorm(dim // num_heads, eps=1e-6) if qk_norm else nn.Identity()
        self.ln_k = nn.RMSNorm(dim // num_heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Identity() if pre_only else Linear(dim, dim)

    def stream(self, x: Tensor) -> tuple[Tensor, nn.Module, nn.Module]:
        """(batch, tokens, dim) -> this stream's part of the joint attention (``attention_heads``)."""
        return self.qkv(x), self.ln_q, self.ln_k

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(batch, tokens, dim) -> q, k, v, each (batch, heads, tokens, head_dim), q and k normed."""
        return attention_heads([self.stream(x)], self.num_heads)


class ImageAttention(SelfAttention):
    """MMDiT-X's second, image-only self-attention (SD3.5-medium's first 13 x blocks)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__(dim, num_heads, qk_norm)
        self.attend = Attention()

    def forward(self, x: Tensor) -> Tensor:
        out = self.attend(*self.heads(x))
        return self.proj(rearrange(out, "B H L D -> B L (H D)"))


class Stream(nn.Module):
    """One token stream of a joint block (the reference's ``DismantledBlock``): adaLN-modulated
    LayerNorm, q k v, and after the joint attention a gated projection and a gated MLP. The
    last block's context stream is ``pre_only`` (q k v from (shift, scale), nothing after);
    ``dual`` adds MMDiT-X's ``attn2`` on the same normed tokens with its own modulation."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool = False,
                 dual: bool = False):
        super().__init__()
        self.pre_only, self.dual = pre_only, dual
        self.norm1 = layer_norm(hidden)
        self.attn = SelfAttention(hidden, num_heads, qk_norm, pre_only)
        self.attn2 = ImageAttention(hidden, num_heads, qk_norm) if dual else nn.Identity()
        self.norm2 = nn.Identity() if pre_only else layer_norm(hidden)
        self.mlp = nn.Identity() if pre_only else Mlp(hidden, int(hidden * mlp_ratio))
        self.chunks = 2 if pre_only else 9 if dual else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden, self.chunks * hidden))

    def modulation(self, c: Tensor) -> list[ModulationOut]:
        """[attention, MLP, attn2] triples (shift, scale, gate) in the checkpoint's order; the
        pre-only stream's one pair has no gate (it has no residual)."""
        out = self.adaLN_modulation(c)[:, None].chunk(self.chunks, dim=-1)
        return [ModulationOut(*out[i:i + 3], *([None] if self.pre_only else [])) for i in range(0, self.chunks, 3)]

    def post_attention(self, x: Tensor, attn: Tensor, mods: list[ModulationOut], normed: Tensor) -> Tensor:
        """The residual updates after the joint attention's output ``attn`` for these tokens."""
        x = mods[0].residual(x, self.attn.proj(attn))
        if self.dual:
            x = mods[2].residual(x, self.attn2(mods[2].modulate(normed)))
        return mods[1].residual(x, self.mlp(mods[1].modulate(self.norm2(x))))


class JointBlock(nn.Module):
    """MMDiT block (Esser et al. 2024, arXiv:2403.03206): context and image tokens keep their own
    weights and attend jointly over ``[context ; x]``, one softmax with no mask."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool, dual: bool):
        super().__init__()
        self.context_block = Stream(hidden, num_heads, mlp_ratio, qk_norm, pre_only=pre_only)
        self.x_block = Stream(hidden, num_heads, mlp_ratio, qk_norm, dual=dual)
        self.attend = Attention()

    def forward(self, context: Tensor, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        cb, xb = self.context_block, self.x_block
        c_mods, x_mods = cb.modulation(c), xb.modulation(c)
        c_attn, x_attn, x_normed = self._attention(context, x, c_mods[0], x_mods[0])
        x = xb.post_attention(x, x_attn, x_mods, x_normed)
        if cb.pre_only:           # the last block: the context stream ends here
            return context, x
        return cb.post_attention(context, c_attn, c_mods, None), x

    def _attention(self, context: Tensor, x: Tensor, c_mod: ModulationOut, x_mod: ModulationOut
                   ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The joint attention's output at the context and at the image tokens, and the normed
        image tokens where MMDiT-X's ``attn2`` reads them again (None otherwise). A method of its
        own so that q, k and v are freed on return, before the MLPs make the block's widest
        tensors: locals would hold them to the end of ``forward`` (the peak of an eager forward)."""
        cb, xb = self.context_block, self.x_block
        c_part = cb.attn.stream(c_mod.modulate(cb.norm1(context)))
        x_normed = xb.norm1(x)
        x_part = xb.attn.stream(x_mod.modulate(x_normed))
        attn = self.attend(*attention_heads([c_part, x_part], xb.attn.num_heads))
        c_attn, x_attn = rearrange(attn, "B H L D -> B L (H D)").split([context.shape[1], x.shape[1]], dim=1)
        return c_attn, x_attn, x_normed if xb.dual else None
