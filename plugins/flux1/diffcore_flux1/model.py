"""The FLUX.1 transformer (Black Forest Labs 2024), in BFL's layout: 19 double-stream (MMDiT)
blocks, 38 single-stream blocks, 3-axis RoPE, sigma / guidance / pooled-CLIP modulation.

Variants differ only in numbers, so they are rows of ``VARIANTS`` (``diffcore_flux1.params``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import attrs
import torch
from torch import Tensor, nn

from diffcore.api import (
    DoubleStreamBlock,
    EmbedND,
    GeluMLP,
    LastLayer,
    Linear,
    MLPEmbedder,
    SingleStreamBlock,
    run_block,
    timestep_embedding,
)
from diffcore_flux1.params import VARIANTS, FluxParams

__all__ = ["VARIANTS", "ControlResiduals", "Flux", "FluxParams", "attention_alias", "diffusers_config", "params_from_diffusers_config"]


@attrs.frozen
class ControlResiduals:
    """What a ControlNet adds to the image tokens after the blocks (diffusers'
    ``controlnet_block_samples`` / ``controlnet_single_block_samples``). N samples over M blocks:
    block i gets sample ``i // ceil(M / N)``, or with ``repeat`` (XLabs) sample ``i % N``."""

    double: tuple[Tensor, ...] = ()
    single: tuple[Tensor, ...] = ()
    repeat: bool = False

    def add(self, img: Tensor, samples: tuple[Tensor, ...], i: int, blocks: int) -> Tensor:
        if not samples:
            return img
        index = i % len(samples) if self.repeat else i // math.ceil(blocks / len(samples))
        return img + samples[index]


class Flux(nn.Module):
    """Velocity (noise - x0) for packed image tokens, given text tokens, pooled text and sigma."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = p = params
        if p.hidden_size % p.num_heads:
            raise ValueError(f"hidden_size {p.hidden_size} is not divisible by num_heads {p.num_heads}")
        head_dim = p.hidden_size // p.num_heads
        if sum(p.axes_dim) != head_dim or any(d % 2 for d in p.axes_dim):
            raise ValueError(f"rope axes {p.axes_dim} must be even and sum to the head dim {head_dim} "
                             f"(= hidden_size {p.hidden_size} / num_heads {p.num_heads})")
        self.pe_embedder = EmbedND(p.axes_dim, p.theta)
        self.img_in = Linear(p.in_channels, p.hidden_size)
        self.time_in = MLPEmbedder(256, p.hidden_size)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size)
        self.guidance_in = MLPEmbedder(256, p.hidden_size) if p.guidance_embed else nn.Identity()
        self.txt_in = Linear(p.context_in_dim, p.hidden_size)
        h, mlp_hidden = p.hidden_size, int(p.hidden_size * p.mlp_ratio)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(h, p.num_heads, lambda: GeluMLP(h, mlp_hidden), qkv_bias=p.qkv_bias)
            for _ in range(p.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(h, p.num_heads, mlp_hidden) for _ in range(p.depth_single_blocks))
        self.final_layer = LastLayer(p.hidden_size, p.out_channels)
        self.gradient_checkpointing = False   # recompute each block's activations in backward (training)

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                y: Tensor, guidance: Tensor | None = None, control: Sequence[ControlResiduals] = ()) -> Tensor:
        """img (B, L_img, in_channels), txt (B, L_txt, context_in_dim), ids (B or 1, L, 3) or (L, 3),
        timesteps = sigma (B,), y pooled (B, vec_in_dim), guidance (B,) for guidance-distilled variants
        (ignored by the others), ``control`` the residuals of ControlNets, added in order.
        Returns (B, L_img, out_channels)."""
        p = self.params
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be (batch, tokens, channels), got {tuple(img.shape)} and "
                             f"{tuple(txt.shape)}")
        if img.shape[-1] != p.in_channels or txt.shape[-1] != p.context_in_dim:
            raise ValueError(f"expected img with {p.in_channels} channels and txt with {p.context_in_dim}, "
                             f"got {img.shape[-1]} and {txt.shape[-1]}")
        txt_ids, img_ids = _batched(txt_ids, txt), _batched(img_ids, img)
        if txt_ids.shape[0] != img_ids.shape[0]:
            txt_ids, img_ids = (ids.expand(img.shape[0], -1, -1) for ids in (txt_ids, img_ids))
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))  # once per forward, shared by every block

        vec = self.time_in(timestep_embedding(timesteps, 256))
        if p.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX.1 variant is guidance-distilled: pass guidance (e.g. 3.5) per sample")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        img, txt = self.img_in(img), self.txt_in(txt)

        ckpt = self.gradient_checkpointing
        for i, block in enumerate(self.double_blocks):
            img, txt = run_block(block, img, txt, pe, vec, checkpointing=ckpt)
            for c in control:
                img = c.add(img, c.double, i, len(self.double_blocks))
        x = torch.cat((txt, img), dim=1)
        for i, block in enumerate(self.single_blocks):
            x = run_block(block, x, pe, vec, checkpointing=ckpt)
            if control:
                img = x[:, txt.shape[1]:]
                for c in control:
                    img = c.add(img, c.single, i, len(self.single_blocks))
                x = torch.cat((x[:, :txt.shape[1]], img), dim=1)
        return self.final_layer(x[:, txt.shape[1]:], vec)


def _batched(ids: Tensor, tokens: Tensor) -> Tensor:
    """(L, axes) or (1 or B, L, axes) ids -> (1 or B, L, axes) for ``tokens`` (B, L, channels).
    Ids shared by the batch stay one row: the RoPE tables are computed once and broadcast."""
    ids = ids[None] if ids.ndim == 2 else ids
    if ids.ndim != 3 or ids.shape[1] != tokens.shape[1] or ids.shape[0] not in (1, tokens.shape[0]):
        raise ValueError(f"position ids {tuple(ids.shape)} do not match {tokens.shape[1]} tokens in a batch of "
                         f"{tokens.shape[0]} (expected ({tokens.shape[0]} or 1, {tokens.shape[1]}, axes) or "
                         f"({tokens.shape[1]}, axes))")
    return ids


_ALIASES = (
    (re.compile(r"transformer_blocks\.(\d+)(\.attn)?"), "double_blocks.{}"),
    (re.compile(r"single_transformer_blocks\.(\d+)(\.attn)?"), "single_blocks.{}"),
    (re.compile(r"(double_blocks|single_blocks)\.(\d+)\.(attend|attn|img_attn|txt_attn)"), None),
)


def attention_alias(name: str) -> str:
    """Our attention layer name for diffusers' (``transformer_blocks.8.attn`` -> ``double_blocks.8``,
    ``single_transformer_blocks.3`` -> ``single_blocks.3``); other names pass through unchanged."""
    for pattern, template in _ALIASES:
        m = pattern.fullmatch(name)
        if m:
            return template.format(m.group(1)) if template else f"{m.group(1)}.{m.group(2)}"
    return name


def params_from_diffusers_config(config: dict) -> FluxParams:
    """``FluxParams`` from a diffusers ``FluxTransformer2DModel`` ``config.json``."""
    heads, head_dim = config.get("num_attention_heads", 24), config.get("attention_head_dim", 128)
    if config.get("patch_size", 1) != 1:
        raise ValueError(f"FLUX.1 transformers have patch_size 1, this config has {config['patch_size']}")
    return FluxParams(
        in_channels=config.get("in_channels", 64),
        out_channels=config.get("out_channels") or config.get("in_channels", 64),
        vec_in_dim=config.get("pooled_projection_dim", 768), context_in_dim=config.get("joint_attention_dim", 4096),
        hidden_size=heads * head_dim, num_heads=heads, depth=config.get("num_layers", 19),
        depth_single_blocks=config.get("num_single_layers", 38),
        axes_dim=tuple(config.get("axes_dims_rope", (16, 56, 56))), guidance_embed=config.get("guidance_embeds", False))


def diffusers_config(params: FluxParams) -> dict:
    """The ``config.json`` of a diffusers ``FluxTransformer2DModel`` with these parameters. diffusers
    fixes what FLUX.1 never varies (MLP ratio 4, biases on q, k, v, theta 10000); other values
    have no diffusers form."""
    fixed = {"mlp_ratio": 4.0, "qkv_bias": True, "theta": 10_000}
    differs = {k: getattr(params, k) for k, v in fixed.items() if getattr(params, k) != v}
    if differs:
        raise ValueError(f"diffusers' FluxTransformer2DModel cannot express {differs} (it fixes {fixed})")
    head_dim = params.hidden_size // params.num_heads
    return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": params.in_channels,
            "out_channels": params.out_channels, "num_layers": params.depth,
            "num_single_layers": params.depth_single_blocks, "attention_head_dim": head_dim,
            "num_attention_heads": params.num_heads, "joint_attention_dim": params.context_in_dim,
            "pooled_projection_dim": params.vec_in_dim, "guidance_embeds": params.guidance_embed,
            "axes_dims_rope": list(params.axes_dim)}
