"""The FLUX.2 transformer (Black Forest Labs, 2025): dev, klein and klein-base.

``Flux2(params)(x, x_ids, timesteps, ctx, ctx_ids, guidance)`` predicts the flow velocity
``noise - x0`` for packed latent tokens ``x`` (batch, tokens, 128) at ``timesteps`` = sigma in
[0, 1]. Position ids are 4-D ``[t, h, w, l]``: image tokens ``[0, row, col, 0]``, text tokens
``[0, 0, 0, index]``, reference images ``[10 * (i + 1), row, col, 0]``. Reference tokens
(``ref``, ``ref_ids``) join the image stream after the target tokens and are cut from the output.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffcore.api import ConfigError, Linear
from diffcore_flux2.layers import (
    TIME_DIM,
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    Modulation,
    SingleStreamBlock,
    timestep_embedding,
)
from diffcore_flux2.params import VARIANTS, Flux2Params

__all__ = ["Flux2", "Flux2Params", "VARIANTS", "attention_alias"]


class Flux2(nn.Module):
    def __init__(self, params: Flux2Params):
        super().__init__()
        p = self.params = params
        if p.hidden_size % p.num_heads:
            raise ConfigError(f"FLUX.2 hidden size {p.hidden_size} is not divisible by {p.num_heads} heads")
        if sum(p.axes_dim) != p.head_dim:
            raise ConfigError(f"FLUX.2 RoPE axes {p.axes_dim} sum to {sum(p.axes_dim)}, the head dim is "
                              f"{p.head_dim} (= {p.hidden_size} / {p.num_heads})")
        if any(d % 2 for d in p.axes_dim):
            raise ConfigError(f"FLUX.2 RoPE axes {p.axes_dim} must all be even (features rotate in pairs)")
        h = p.hidden_size
        self.gradient_checkpointing = False
        self.pe_embedder = EmbedND(p.theta, p.axes_dim)
        self.img_in = Linear(p.in_channels, h, bias=False)
        self.txt_in = Linear(p.context_in_dim, h, bias=False)
        self.time_in = MLPEmbedder(TIME_DIM, h)
        self.guidance_in = MLPEmbedder(TIME_DIM, h) if p.guidance_embed else None
        self.double_stream_modulation_img = Modulation(h, sets=2)
        self.double_stream_modulation_txt = Modulation(h, sets=2)
        self.single_stream_modulation = Modulation(h, sets=1)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(h, p.num_heads, p.mlp_hidden) for _ in range(p.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(h, p.num_heads, p.mlp_hidden) for _ in range(p.depth_single_blocks))
        self.final_layer = LastLayer(h, p.in_channels)

    def forward(self, x: Tensor, x_ids: Tensor, timesteps: Tensor, ctx: Tensor, ctx_ids: Tensor,
                guidance: Tensor | None = None, ref: Tensor | None = None, ref_ids: Tensor | None = None) -> Tensor:
        p = self.params
        batch, tokens, channels = x.shape
        if channels != p.in_channels or ctx.shape[-1] != p.context_in_dim:
            raise ValueError(f"FLUX.2 {p.hidden_size}-wide expects x (batch, tokens, {p.in_channels}) and ctx "
                             f"(batch, text, {p.context_in_dim}); got x {tuple(x.shape)}, ctx {tuple(ctx.shape)}")
        if p.guidance_embed and guidance is None:
            raise ValueError("this FLUX.2 model embeds the guidance scale (dev): pass guidance= "
                             "(BFL's default is 4.0)")
        ids = [batched(ctx_ids, batch), batched(x_ids, batch)]
        if ref is not None:
            if ref_ids is None:
                raise ValueError("reference tokens need their position ids (ref_ids)")
            x = torch.cat([x, batched(ref, batch).to(x)], dim=1)
            ids.append(batched(ref_ids, batch))
        pe = self.pe_embedder(torch.cat(ids, dim=1))

        dtype = self.img_in.weight.dtype
        img, txt = self.img_in(x.to(dtype)), self.txt_in(ctx.to(dtype))
        vec = self.time_in(timestep_embedding(_per_sample(timesteps, batch, x)).to(dtype))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(_per_sample(guidance, batch, x)).to(dtype))
        img_mod, txt_mod = self.double_stream_modulation_img(vec), self.double_stream_modulation_txt(vec)
        single_mod = self.single_stream_modulation(vec)[0]

        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, pe, img_mod, txt_mod)
        seq = torch.cat([txt, img], dim=1)
        image = slice(txt.shape[1], txt.shape[1] + tokens)  # the last block computes outputs for these only
        for i, block in enumerate(self.single_blocks):
            last = i == len(self.single_blocks) - 1
            seq = self._run(block, seq, pe, single_mod, image if last else None)
        if not self.single_blocks:
            seq = seq[:, image]
        return self.final_layer(seq, vec).to(x.dtype)

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def batched(ids: Tensor, batch: int) -> Tensor:
    """A shared (tokens, features) tensor (ids, reference tokens) or a batched one -> (batch, tokens, features)."""
    return ids.unsqueeze(0).expand(batch, -1, -1) if ids.ndim == 2 else ids.expand(batch, -1, -1)


def _per_sample(t: Tensor | float, batch: int, like: Tensor) -> Tensor:
    return torch.as_tensor(t, device=like.device).reshape(-1).expand(batch)


_DIFFUSERS_LAYER = re.compile(r"(single_)?transformer_blocks\.(\d+)(?:\.attn)?")


def attention_alias(name: str) -> str:
    """diffusers' ``transformer_blocks.N(.attn)`` is ``double_blocks.N``; ``single_transformer_blocks.N(.attn)``
    is ``single_blocks.N``; any other name is returned unchanged."""
    m = _DIFFUSERS_LAYER.fullmatch(name)
    if not m:
        return name
    return f"{'single' if m.group(1) else 'double'}_blocks.{m.group(2)}"
