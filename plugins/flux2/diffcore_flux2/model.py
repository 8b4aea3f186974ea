"""The FLUX.2 transformer (Black Forest Labs, 2025): dev, klein and klein-base.

``Flux2(params)(x, x_ids, timesteps, ctx, ctx_ids, guidance)`` predicts the flow velocity
``noise - x0`` for packed latent tokens ``x`` (batch, tokens, 128) at ``timesteps`` = sigma in
[0, 1]. Position ids are 4-D ``[t, h, w, l]``: image tokens ``[0, row, col, 0]``, text tokens
``[0, 0, 0, index]``, reference images ``[10 * (i + 1), row, col, 0]``. Reference tokens
(``ref``, ``ref_ids``) join the image stream after the target tokens and are cut from the output.

The blocks are FLUX.1's (``diffcore.nn.mmdit``) with what BFL changed: no biases anywhere, a
SwiGLU MLP whose input projection is fused [gate | up], and adaLN modulation computed once per
forward from the timestep (+ guidance) embedding and shared by every block, so blocks hold no
modulation weights (and modulate with fused multiply-adds).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffcore.api import (
    ConfigError,
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    Linear,
    MLPEmbedder,
    Modulation,
    ModulationOut,
    SingleStreamBlock,
    swiglu_mlp,
    timestep_embedding,
)
from diffcore_flux2.references import ReferenceCache, ReferenceSpan
from diffcore_flux2.params import VARIANTS, Flux2Params

TIME_DIM = 256

__all__ = ["Flux2", "Flux2Params", "ReferenceCache", "VARIANTS", "attention_alias"]


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
        self.pe_embedder = EmbedND(p.axes_dim, p.theta)
        self.img_in = Linear(p.in_channels, h, bias=False)
        self.txt_in = Linear(p.context_in_dim, h, bias=False)
        self.time_in = MLPEmbedder(TIME_DIM, h, bias=False)
        self.guidance_in = MLPEmbedder(TIME_DIM, h, bias=False) if p.guidance_embed else None
        self.double_stream_modulation_img = Modulation(h, double=True, bias=False, fused=True)
        self.double_stream_modulation_txt = Modulation(h, double=True, bias=False, fused=True)
        self.single_stream_modulation = Modulation(h, double=False, bias=False, fused=True)
        # no biases; the blocks read the shared modulations above instead of holding their own
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(h, p.num_heads, lambda: swiglu_mlp(h, p.mlp_hidden), qkv_bias=False, bias=False,
                              modulation=False) for _ in range(p.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(h, p.num_heads, p.mlp_hidden, mlp_act="swiglu", bias=False, modulation=False)
            for _ in range(p.depth_single_blocks))
        self.final_layer = LastLayer(h, p.in_channels, bias=False, fused=True)

    def forward(self, x: Tensor, x_ids: Tensor, timesteps: Tensor, ctx: Tensor, ctx_ids: Tensor,
                guidance: Tensor | None = None, ref: Tensor | None = None, ref_ids: Tensor | None = None,
                ref_cache: ReferenceCache | None = None) -> Tensor:
        """Velocity for the image tokens ``x``. ``ref``: reference tokens, appended after the
        image tokens (BFL's editing). With ``ref_cache`` (klein-9b-kv) the references instead
        sit between text and image, attend only to each other at timestep 0, and leave their
        keys and values in the cache; once it is filled, ``ref`` is not needed (and ignored)."""
        p = self.params
        batch, tokens, channels = x.shape
        if channels != p.in_channels or ctx.shape[-1] != p.context_in_dim:
            raise ValueError(f"FLUX.2 {p.hidden_size}-wide expects x (batch, tokens, {p.in_channels}) and ctx "
                             f"(batch, text, {p.context_in_dim}); got x {tuple(x.shape)}, ctx {tuple(ctx.shape)}")
        if p.guidance_embed and guidance is None:
            raise ValueError("this FLUX.2 model embeds the guidance scale (dev): pass guidance= "
                             "(BFL's default is 4.0)")
        if ref is not None and ref_ids is None:
            raise ValueError("reference tokens need their position ids (ref_ids)")
        filling = ref_cache is not None and not ref_cache.filled
        if filling and ref is None:
            raise ValueError("an empty reference cache is filled from the reference tokens: pass ref= and ref_ids=")
        if ref_cache is not None and ref_cache.filled:
            ref = ref_ids = None  # their keys and values are in the cache
        refs = 0 if ref is None else ref.shape[-2]
        ids = [batched(ctx_ids, batch), batched(x_ids, batch)]
        if ref is not None:
            ref, ref_ids = batched(ref, batch).to(x), batched(ref_ids, batch)
            x = torch.cat([ref, x] if filling else [x, ref], dim=1)
            ids.insert(1 if filling else 2, ref_ids)
        pe = self.pe_embedder(torch.cat(ids, dim=1))

        dtype = self.img_in.weight.dtype
        img, txt = self.img_in(x.to(dtype)), self.txt_in(ctx.to(dtype))
        vec = self.embed_time(timesteps, guidance, batch, x)
        img_mod, txt_mod = self.double_stream_modulation_img(vec), self.double_stream_modulation_txt(vec)
        single_mod = self.single_stream_modulation(vec)[0]
        image_tokens = slice(txt.shape[1], txt.shape[1] + tokens)  # where they sit after the text
        spans: list[ReferenceSpan | None] = [None] * (len(self.double_blocks) + len(self.single_blocks))
        if ref_cache is not None:
            spans = self.reference_spans(ref_cache, txt.shape[1], refs if filling else 0, tokens, x.device)
        if filling:  # references are modulated as at timestep 0, and come before the image tokens
            ref_vec = self.embed_time(torch.zeros_like(_per_sample(timesteps, batch, x)), guidance, batch, x)
            img_mod = [_per_token([r, m], [refs, tokens])
                       for r, m in zip(self.double_stream_modulation_img(ref_vec), img_mod)]
            single_mod = _per_token([single_mod, self.single_stream_modulation(ref_vec)[0], single_mod],
                                    [txt.shape[1], refs, tokens])
            image_tokens = slice(txt.shape[1] + refs, txt.shape[1] + refs + tokens)

        for block, span in zip(self.double_blocks, spans):
            img, txt = self._run(block, img, txt, pe, None, (img_mod, txt_mod), span)
        seq = torch.cat([txt, img], dim=1)
        for i, (block, span) in enumerate(zip(self.single_blocks, spans[len(self.double_blocks):])):
            last = i == len(self.single_blocks) - 1
            seq = self._run(block, seq, pe, None, single_mod, image_tokens if last else None, span)
        if not self.single_blocks:
            seq = seq[:, image_tokens]
        return self.final_layer(seq, vec).to(x.dtype)

    def embed_time(self, timesteps: Tensor, guidance: Tensor | None, batch: int, like: Tensor) -> Tensor:
        """The conditioning vector every modulation reads: time (+ guidance) embeddings."""
        dtype = self.img_in.weight.dtype
        vec = self.time_in(timestep_embedding(_per_sample(timesteps, batch, like)).to(dtype))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(_per_sample(guidance, batch, like)).to(dtype))
        return vec

    def reference_spans(self, cache: ReferenceCache, txt: int, refs: int, tokens: int,
                        device: torch.device) -> list[ReferenceSpan]:
        """Each block's view of ``cache``; while filling, every query may attend to everything
        except that the ``refs`` reference queries (after the text) see only the references."""
        mask = None
        if refs:
            length = txt + refs + tokens
            mask = torch.ones(length, length, dtype=torch.bool, device=device)
            mask[txt:txt + refs, :txt] = False
            mask[txt:txt + refs, txt + refs:] = False
        names = [f"double_blocks.{i}" for i in range(len(self.double_blocks))]
        names += [f"single_blocks.{i}" for i in range(len(self.single_blocks))]
        return [ReferenceSpan(cache, name, txt, refs, mask) for name in names]

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def batched(ids: Tensor, batch: int) -> Tensor:
    """A shared (tokens, features) tensor (ids, reference tokens) or a batched one -> (batch, tokens, features)."""
    return ids.unsqueeze(0).expand(batch, -1, -1) if ids.ndim == 2 else ids.expand(batch, -1, -1)


def _per_sample(t: Tensor | float, batch: int, like: Tensor) -> Tensor:
    return torch.as_tensor(t, device=like.device).reshape(-1).expand(batch)


def _per_token(mods: list[ModulationOut], counts: list[int]) -> ModulationOut:
    """Per-token (shift, scale, gate): ``mods[i]`` for the next ``counts[i]`` tokens."""
    return type(mods[0])(*(torch.cat([m.expand(m.shape[0], n, -1) for m, n in zip(parts, counts)], dim=1)
                           for parts in zip(*mods)))


_DIFFUSERS_LAYER = re.compile(r"(single_)?transformer_blocks\.(\d+)(?:\.attn)?")


def attention_alias(name: str) -> str:
    """diffusers' ``transformer_blocks.N(.attn)`` is ``double_blocks.N``; ``single_transformer_blocks.N(.attn)``
    is ``single_blocks.N``; any other name is returned unchanged."""
    m = _DIFFUSERS_LAYER.fullmatch(name)
    if not m:
        return name
    return f"{'single' if m.group(1) else 'double'}_blocks.{m.group(2)}"
