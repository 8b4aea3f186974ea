"""The SD3 / SD3.5 MMDiT (Stability AI 2024; MMDiT-X for SD3.5-medium), in the reference's layout:
patchify conv plus a cropped stored positional table, timestep + pooled-text conditioning, joint
blocks over ``[context ; image]`` tokens, a final adaLN layer and un-patchify.

Variants differ only in numbers, so they are rows of ``VARIANTS`` (``diffcore_sd3.params``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffcore.api import LastLayer, Linear, timestep_embedding

from diffcore_sd3.layers import JointBlock, PatchEmbed, VectorEmbedder, sincos_table
from diffcore_sd3.params import VARIANTS, SD3Params

__all__ = ["MMDiT", "SD3Params", "VARIANTS", "attention_alias", "diffusers_config", "params_from_diffusers_config"]


class MMDiT(nn.Module):
    """Velocity (noise - x0) for latents ``x`` (B, 16, H, W) at noise level sigma, given the text
    sequence ``context`` and the pooled text ``y``.

    ``gradient_checkpointing``: with gradients on, each joint block's activations are recomputed
    in the backward pass instead of kept (``torch.utils.checkpoint``, non-reentrant)."""

    def __init__(self, params: SD3Params):
        super().__init__()
        self.gradient_checkpointing = False
        self.params = p = params
        if p.hidden_size % p.num_heads:
            raise ValueError(f"hidden_size {p.hidden_size} is not divisible by num_heads {p.num_heads}")
        if not set(p.dual_attention_layers) <= set(range(p.depth - 1)):
            raise ValueError(f"dual_attention_layers {p.dual_attention_layers} must be blocks 0..{p.depth - 2} "
                             f"(the last of the {p.depth} blocks has no second attention)")
        self.x_embedder = PatchEmbed(p.in_channels, p.hidden_size, p.patch_size)
        table = sincos_table(p.hidden_size, p.pos_embed_max_size, p.pos_embed_base)
        self.register_buffer("pos_embed", table[None], persistent=True)
        self.t_embedder = VectorEmbedder(256, p.hidden_size)
        self.y_embedder = VectorEmbedder(p.pooled_dim, p.hidden_size)
        self.context_embedder = Linear(p.context_in_dim, p.hidden_size)
        self.joint_blocks = nn.ModuleList(
            JointBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qk_norm, pre_only=i == p.depth - 1,
                       dual=i in p.dual_attention_layers) for i in range(p.depth))
        self.final_layer = LastLayer(p.hidden_size, p.patch_size ** 2 * p.out_channels)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor,
                skip_layers: Iterable[int] = ()) -> Tensor:
        """x (B, in_channels, H, W), timesteps = sigma (B,), context (B, L, context_in_dim), y (B,
        pooled_dim); ``skip_layers``: joint blocks to leave out (skip-layer guidance).
        Returns (B, out_channels, H, W)."""
        p = self.params
        skip = self._check(x, context, y, skip_layers)
        h, w = x.shape[-2] // p.patch_size, x.shape[-1] // p.patch_size
        x = self.x_embedder(x) + self.cropped_pos_embed(h, w).to(x.dtype)
        c = self.t_embedder(timestep_embedding(timesteps.float()).to(x.dtype)) + self.y_embedder(y)
        context = self.context_embedder(context)
        for i, block in enumerate(self.joint_blocks):
            if i in skip:
                continue
            if self.gradient_checkpointing and torch.is_grad_enabled():
                context, x = checkpoint(block, context, x, c, use_reentrant=False)
            else:
                context, x = block(context, x, c)
        x = self.final_layer(x, c)
        # the patch is channel-last here (p q c), unlike the patchify conv's input (c p q)
        return rearrange(x, "B (h w) (p q c) -> B c (h p) (w q)", h=h, p=p.patch_size, q=p.patch_size)

    def cropped_pos_embed(self, h: int, w: int) -> Tensor:
        """The centre ``h x w`` of the stored ``max x max`` table, as (1, h * w, hidden)."""
        size = self.params.pos_embed_max_size
        top, left = (size - h) // 2, (size - w) // 2
        grid = rearrange(self.pos_embed, "1 (H W) D -> H W D", H=size)
        return rearrange(grid[top:top + h, left:left + w], "h w D -> 1 (h w) D")

    def _check(self, x: Tensor, context: Tensor, y: Tensor, skip_layers: Iterable[int]) -> set[int]:
        p = self.params
        if x.ndim != 4 or x.shape[1] != p.in_channels:
            raise ValueError(f"expected latents (batch, {p.in_channels}, height, width), got {tuple(x.shape)}")
        if x.shape[-2] % p.patch_size or x.shape[-1] % p.patch_size:
            raise ValueError(f"latent height and width must be multiples of the patch size {p.patch_size}, "
                             f"got {tuple(x.shape[-2:])}")
        most = p.pos_embed_max_size * p.patch_size
        if max(x.shape[-2:]) > most:
            raise ValueError(f"latents {tuple(x.shape[-2:])} are larger than the positional table allows: at most "
                             f"{most} x {most} ({most * 8} pixels a side with the 8x VAE)")
        if context.ndim != 3 or context.shape[-1] != p.context_in_dim or y.shape[-1:] != (p.pooled_dim,):
            raise ValueError(f"expected context (batch, tokens, {p.context_in_dim}) and pooled (batch, "
                             f"{p.pooled_dim}), got {tuple(context.shape)} and {tuple(y.shape)}")
        skip = {int(i) for i in skip_layers}
        if not skip <= set(range(p.depth)):
            raise ValueError(f"skip_layers {sorted(skip)} name blocks outside 0..{p.depth - 1}")
        return skip


_ALIASES = (
    (re.compile(r"transformer_blocks\.(\d+)(\.attn)?"), "joint_blocks.{}"),
    (re.compile(r"transformer_blocks\.(\d+)\.attn2"), "joint_blocks.{}.x_block.attn2"),
    (re.compile(r"joint_blocks\.(\d+)\.(attend|x_block\.attn|context_block\.attn)"), "joint_blocks.{}"),
)


def attention_alias(name: str) -> str:
    """Our attention layer name for diffusers' (``transformer_blocks.8.attn`` -> ``joint_blocks.8``,
    ``transformer_blocks.3.attn2`` -> ``joint_blocks.3.x_block.attn2``); others pass unchanged."""
    for pattern, template in _ALIASES:
        m = pattern.fullmatch(name)
        if m:
            return template.format(m.group(1))
    return name


def params_from_diffusers_config(config: dict) -> SD3Params:
    """``SD3Params`` from a diffusers ``SD3Transformer2DModel`` ``config.json``."""
    heads, head_dim = config.get("num_attention_heads", 18), config.get("attention_head_dim", 64)
    hidden = heads * head_dim
    if config.get("caption_projection_dim", hidden) != hidden:
        raise ValueError(f"caption_projection_dim {config['caption_projection_dim']} differs from the width "
                         f"{hidden} (heads x head dim): no SD3 model does that")
    qk_norm = config.get("qk_norm")
    if qk_norm not in (None, "rms_norm"):
        raise ValueError(f"qk_norm {qk_norm!r}: SD3 models use none or 'rms_norm'")
    return SD3Params(
        in_channels=config.get("in_channels", 16), out_channels=config.get("out_channels") or 16,
        patch_size=config.get("patch_size", 2), context_in_dim=config.get("joint_attention_dim", 4096),
        pooled_dim=config.get("pooled_projection_dim", 2048), hidden_size=hidden, num_heads=heads,
        depth=config.get("num_layers", 18), pos_embed_max_size=config.get("pos_embed_max_size", 96),
        pos_embed_base=config.get("sample_size", 128) // config.get("patch_size", 2),
        qk_norm=qk_norm == "rms_norm", dual_attention_layers=tuple(config.get("dual_attention_layers", ())))


def diffusers_config(params: SD3Params) -> dict:
    """The ``config.json`` of a diffusers ``SD3Transformer2DModel`` with these parameters
    (diffusers fixes the MLP ratio at 4)."""
    if params.mlp_ratio != 4.0:
        raise ValueError(f"diffusers' SD3Transformer2DModel fixes mlp_ratio 4, these params have {params.mlp_ratio}")
    return {"_class_name": "SD3Transformer2DModel", "sample_size": params.pos_embed_base * params.patch_size,
            "patch_size": params.patch_size, "in_channels": params.in_channels, "out_channels": params.out_channels,
            "num_layers": params.depth, "attention_head_dim": params.head_dim, "num_attention_heads": params.num_heads,
            "joint_attention_dim": params.context_in_dim, "caption_projection_dim": params.hidden_size,
            "pooled_projection_dim": params.pooled_dim, "pos_embed_max_size": params.pos_embed_max_size,
            "dual_attention_layers": list(params.dual_attention_layers),
            "qk_norm": "rms_norm" if params.qk_norm else None}

