"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie, 2023, arXiv:2212.09748).

Class-conditional transformer over 2-D patches with adaLN-Zero blocks. Here it predicts the
flow-matching velocity ``v = noise - x0`` at ``sigma`` in [0, 1]; the timestep sinusoid reads
``1000 * sigma`` as FLUX does, so weights keep DiT's (and diffusers') timestep scale; its
frequencies are diffusers' (``freq_shift``, see ``DiTParams``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffcore.api import Attention, ConfigError, layer_norm, timestep_embedding
from diffcore_dit.params import DiTParams

TIME_DIM = 256


def sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed (grid*grid, dim) position embedding: [column | row] halves, each [sin | cos] (MAE / DiT)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def axis(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    return torch.cat([axis(cols), axis(rows)], dim=-1).float()


class SelfAttention(nn.Module):
    """Fused qkv projection; the softmax part is ``op``, so this module's path names the layer."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.op = Attention()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return self.proj(rearrange(self.op(q, k, v), "b h n d -> b n (h d)"))


class DiTBlock(nn.Module):
    """adaLN-Zero block (DiT fig. 3): attention and MLP on modulated LayerNorms, each gated."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = layer_norm(hidden)
        self.attn = SelfAttention(hidden, heads)
        self.norm2 = layer_norm(hidden)
        mlp = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, hidden))
        self.modulation = nn.Linear(hidden, 6 * hidden)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = rearrange(self.modulation(vec), "b (n d) -> n b 1 d", n=6)
        x = x + gate1 * self.attn((1 + scale1) * self.norm1(x) + shift1)
        return x + gate2 * self.mlp((1 + scale2) * self.norm2(x) + shift2)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a Linear to ``patch * patch * channels`` values per token."""

    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.norm = layer_norm(hidden)
        self.modulation = nn.Linear(hidden, 2 * hidden)
        self.linear = nn.Linear(hidden, out)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = rearrange(self.modulation(vec), "b (n d) -> n b 1 d", n=2)
        return self.linear((1 + scale) * self.norm(x) + shift)


class DiT2D(nn.Module):
    """``forward(x, sigma, y) -> velocity``; ``y == num_classes`` (or ``y=None``) is the null class."""

    def __init__(self, params: DiTParams):
        super().__init__()
        p = params
        if p.hidden % p.heads:
            raise ConfigError(f"DiT hidden size {p.hidden} is not divisible by {p.heads} heads")
        if p.hidden % 4:
            raise ConfigError(f"DiT hidden size {p.hidden} must be a multiple of 4 (2-D sine-cosine positions)")
        if p.image_size % p.patch:
            raise ConfigError(f"DiT image size {p.image_size} is not divisible by patch size {p.patch}")
        self.params = p
        self.gradient_checkpointing = False
        h = p.hidden
        self.patch_embed = nn.Conv2d(p.in_channels, h, kernel_size=p.patch, stride=p.patch)
        self.register_buffer("pos", sincos_2d(h, p.image_size // p.patch), persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(TIME_DIM, h), nn.SiLU(), nn.Linear(h, h))
        self.y_embed = nn.Embedding(p.num_classes + 1, h)
        self.blocks = nn.ModuleList(DiTBlock(h, p.heads, p.mlp_ratio) for _ in range(p.depth))
        self.final = FinalLayer(h, p.patch * p.patch * p.in_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's init: xavier Linears, N(0, 0.02) embeddings, zero modulations and output (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.params.hidden, -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for lin in (self.t_embed[0], self.t_embed[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for lin in [b.modulation for b in self.blocks] + [self.final.modulation, self.final.linear]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, sigma: Tensor, y: Tensor | None = None) -> Tensor:
        p = self.params
        if tuple(x.shape[1:]) != (p.in_channels, p.image_size, p.image_size):
            raise ValueError(f"DiT expects input (batch, {p.in_channels}, {p.image_size}, {p.image_size}), "
                             f"got {tuple(x.shape)}")
        batch, dtype = x.shape[0], self.patch_embed.weight.dtype
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(batch)
        if y is None:
            y = torch.full((batch,), p.num_classes, dtype=torch.long, device=x.device)
        t = timestep_embedding(sigma.float(), TIME_DIM, freq_shift=p.freq_shift).to(dtype)
        vec = F.silu(self.t_embed(t) + self.y_embed(y))  # every modulation reads silu(c)
        tokens = rearrange(self.patch_embed(x.to(dtype)), "b d h w -> b (h w) d") + self.pos.to(dtype)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, vec, use_reentrant=False)
            else:
                tokens = block(tokens, vec)
        out = self.final(tokens, vec)
        side = p.image_size // p.patch
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=side, p=p.patch, q=p.patch).to(x.dtype)
