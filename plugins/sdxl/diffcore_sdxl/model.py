"""The SDXL UNet (Podell et al. 2023, arXiv:2307.01952) in Stability's checkpoint layout:
``input_blocks`` down, ``middle_block``, ``output_blocks`` up with skip connections, conditioned
on the DDPM timestep, the text tokens (cross-attention) and ``y``, the pooled text and the
micro-conditioning scalars (the label embedding).

Variants differ only in numbers, so they are rows of ``VARIANTS`` (``diffcore_sdxl.params``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from diffcore.api import Conv2d, Linear

from diffcore_sdxl.layers import Downsample, ResBlock, SpatialTransformer, Upsample, group_norm, timestep_sinusoid
from diffcore_sdxl.params import VARIANTS, UNetParams

__all__ = ["VARIANTS", "UNet", "UNetParams", "attention_alias", "diffusers_config", "label_vector",
           "params_from_diffusers_config"]


class Step(nn.ModuleList):
    """One entry of ``input_blocks`` / ``output_blocks`` (SGM's ``TimestepEmbedSequential``): its
    layers in order, each given what it takes."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


def _mlp(dim_in: int, dim: int) -> nn.Sequential:
    return nn.Sequential(Linear(dim_in, dim), nn.SiLU(), Linear(dim, dim))


class UNet(nn.Module):
    """Noise (or v) prediction for latents ``x`` (B, C, H, W) at DDPM timestep ``t`` (B,), given
    text tokens ``context`` (B, L, context_dim) and ``y`` (B, adm_in_channels)."""

    def __init__(self, params: UNetParams):
        super().__init__()
        self.params = p = params
        if len(p.transformer_depth) != len(p.channel_mult):
            raise ValueError(f"transformer_depth {p.transformer_depth} needs one entry per level of "
                             f"channel_mult {p.channel_mult}")
        if any(w % p.head_dim for w in p.widths):
            raise ValueError(f"level widths {p.widths} must be multiples of head_dim {p.head_dim}")
        emb, groups = p.time_embed_dim, p.norm_groups

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            return SpatialTransformer(ch, ch // p.head_dim, depth, p.context_dim, groups)

        self.time_embed = _mlp(p.model_channels, emb)
        self.label_emb = nn.Sequential(_mlp(p.adm_in_channels, emb))
        self.input_blocks = nn.ModuleList([Step([Conv2d(p.in_channels, p.model_channels, 3, padding=1)])])
        ch, skips = p.model_channels, [p.model_channels]
        for level, (width, depth) in enumerate(zip(p.widths, p.transformer_depth)):
            for _ in range(p.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, width, emb, groups)]
                ch = width
                if depth:
                    layers.append(transformer(ch, depth))
                self.input_blocks.append(Step(layers))
                skips.append(ch)
            if level != len(p.widths) - 1:
                self.input_blocks.append(Step([Downsample(ch)]))
                skips.append(ch)
        self.middle_block = Step([ResBlock(ch, ch, emb, groups), transformer(ch, p.transformer_depth_middle),
                                  ResBlock(ch, ch, emb, groups)])
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(p.widths))):
            width, depth = p.widths[level], p.transformer_depth[level]
            for i in range(p.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), width, emb, groups)]
                ch = width
                if depth:
                    layers.append(transformer(ch, depth))
                if level and i == p.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Step(layers))
        self.out = nn.Sequential(group_norm(ch, groups), nn.SiLU(), Conv2d(ch, p.out_channels, 3, padding=1))

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor, down_residuals: Sequence[Tensor] = (),
                mid_residual: Tensor | None = None) -> Tensor:
        """``down_residuals`` (one per input block) and ``mid_residual``: a ControlNet's additions to
        the skip connections and the middle block's output (diffusers' ``down_block_additional_residuals``,
        ``mid_block_additional_residual``)."""
        p = self.params
        if x.ndim != 4 or x.shape[1] != p.in_channels:
            raise ValueError(f"expected latents (batch, {p.in_channels}, height, width), got {tuple(x.shape)}")
        if context.shape[-1] != p.context_dim or y.shape[-1] != p.adm_in_channels:
            raise ValueError(f"expected context with {p.context_dim} features and y with {p.adm_in_channels}, "
                             f"got {context.shape[-1]} and {y.shape[-1]}")
        t = timesteps.expand(x.shape[0]) if timesteps.ndim == 0 else timesteps
        emb = self.time_embed(timestep_sinusoid(t, p.model_channels).to(x.dtype)) + self.label_emb(y.to(x.dtype))
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        if down_residuals:
            if len(down_residuals) != len(hs):
                raise ValueError(f"{len(down_residuals)} down residuals for {len(hs)} input blocks")
            hs = [a + b for a, b in zip(hs, down_residuals)]
        if mid_residual is not None:
            h = h + mid_residual
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context, size=hs[-1].shape[-2:] if hs else None)
        return self.out(h).contiguous()   # oneDNN may leave its convolutions channels-last


def label_vector(pooled: Tensor, scalars: Tensor, dim: int = 256) -> Tensor:
    """``y``: pooled text ‖ a ``dim``-wide sinusoid of each micro-conditioning scalar (original size,
    crop, target size or aesthetic score), in that order (SGM's embedder order; diffusers'
    ``text_time`` embedding)."""
    sinusoids = rearrange(timestep_sinusoid(scalars.flatten(), dim), "(B N) D -> B (N D)", B=scalars.shape[0])
    return torch.cat([pooled, sinusoids.to(pooled.dtype)], dim=-1)


def attention_alias(name: str, params: UNetParams) -> str:
    """Our attention layer name for diffusers' (``down_blocks.2.attentions.1`` -> ``input_blocks.8.1``,
    ``mid_block.attentions.0`` -> ``middle_block.1``, ``up_blocks.0.attentions.1`` ->
    ``output_blocks.1.1``; ``....transformer_blocks.3.attn2`` suffixes follow); other names pass."""
    n = params.num_res_blocks + 1
    m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)(\..+)?", name)
    if m:
        level, j, rest = int(m.group(2)), int(m.group(3)), m.group(4) or ""
        if m.group(1) == "down_blocks":
            return f"input_blocks.{1 + level * n + j}.1{rest}"
        return f"output_blocks.{level * n + j}.1{rest}"
    m = re.fullmatch(r"mid_block\.attentions\.0(\..+)?", name)
    if m:
        return f"middle_block.1{m.group(1) or ''}"
    return name


def params_from_diffusers_config(config: dict) -> UNetParams:
    """``UNetParams`` from a diffusers ``UNet2DConditionModel`` ``config.json``. Its
    ``attention_head_dim`` holds head *counts* per level (a legacy name); SDXL's heads are 64 wide."""
    widths = list(config.get("block_out_channels", (320, 640, 1280)))
    kinds = list(config.get("down_block_types", ()))
    per_level = config.get("transformer_layers_per_block", 1)
    per_level = [per_level] * len(widths) if isinstance(per_level, int) else list(per_level)
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = [heads] * len(widths) if isinstance(heads, int) else list(heads)
    attention = [kind.startswith("CrossAttn") for kind in kinds]
    head_dims = {w // h for w, h, a in zip(widths, heads, attention) if a}
    if len(head_dims) != 1 or config.get("addition_embed_type") != "text_time":
        raise ValueError(f"not an SDXL UNet config: head widths {sorted(head_dims)} (SDXL has one, 64) and "
                         f"addition_embed_type {config.get('addition_embed_type')!r} (SDXL: 'text_time')")
    return UNetParams(
        in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4),
        model_channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=config.get("layers_per_block", 2),
        transformer_depth=tuple(d if a else 0 for d, a in zip(per_level, attention)),
        transformer_depth_middle=per_level[-1], head_dim=head_dims.pop(),
        context_dim=config.get("cross_attention_dim", 2048),
        adm_in_channels=config.get("projection_class_embeddings_input_dim", 2816),
        time_embed_scalar_dim=config.get("addition_time_embed_dim", 256),
        norm_groups=config.get("norm_num_groups", 32))


def diffusers_config(p: UNetParams) -> dict:
    """The ``config.json`` of a diffusers ``UNet2DConditionModel`` with these parameters."""
    attention = [d > 0 for d in p.transformer_depth]
    depth = [d or 1 for d in p.transformer_depth[:-1]] + [p.transformer_depth_middle]
    if p.transformer_depth[-1] and p.transformer_depth[-1] != p.transformer_depth_middle:
        raise ValueError(f"diffusers' UNet gives the middle block the last level's depth; these params have "
                         f"{p.transformer_depth[-1]} and {p.transformer_depth_middle}")
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    return {"_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": p.in_channels,
            "out_channels": p.out_channels, "block_out_channels": list(p.widths), "layers_per_block": p.num_res_blocks,
            "down_block_types": down, "up_block_types": [k.replace("Down", "Up") for k in reversed(down)],
            "transformer_layers_per_block": depth, "attention_head_dim": [w // p.head_dim for w in p.widths],
            "use_linear_projection": True, "cross_attention_dim": p.context_dim, "addition_embed_type": "text_time",
            "addition_time_embed_dim": p.time_embed_scalar_dim, "norm_num_groups": p.norm_groups,
            "projection_class_embeddings_input_dim": p.adm_in_channels, "flip_sin_to_cos": True, "freq_shift": 0}
