"""Attention-level guidance: PAG, NAG and NAG-PAG, on named attention layers of any family.

They patch the ``diffcore.api.Attention`` op of the chosen layers for one branch's rows only
(the core's ``patch_attention``), so they work on every family that routes its softmax through
that op. Layer names are the family's own (``blocks.3.attn``), diffusers-style aliases the family
maps (``transformer_blocks.3.attn``), or shell patterns (``"*"``, ``"blocks.1?.attn"``); an unknown
name is an error that lists the model's layers (``diffcore layers FAMILY`` prints them).

Where each one costs (forward passes per step, without CFG):

- PAG: 2 (cond + the perturbed cond, batched into one forward of twice the batch);
- NAG: 2 (cond + the negative branch, batched; shared with CFG's ``uncond`` when both run);
- NAG-PAG: 1, the cond branch itself is patched.
"""

from __future__ import annotations

import attrs
import torch

from diffcore.api import UNCOND, AttentionContext, Branch, BranchPatch, GuidanceProcessor, PluginError, StepInfo


def identity_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: object = None) -> torch.Tensor:
    """PAG's perturbation: the attention map replaced by the identity, so each token's output is
    its own value, ``softmax(...) -> I`` and ``out = v``. Defined for self-attention only."""
    if q.shape[-2] != v.shape[-2]:
        raise PluginError(f"identity attention needs self-attention (as many queries as values), this layer has "
                          f"{q.shape[-2]} queries and {v.shape[-2]} keys/values: choose self- or joint-attention "
                          f"layers (diffcore layers FAMILY lists them)")
    return v


def nag_combine(positive: torch.Tensor, negative: torch.Tensor, scale: float, tau: float,
                alpha: float) -> torch.Tensor:
    """NAG's feature guidance (Chen et al. 2025, arXiv:2505.21179), per token:

    ``Z~ = phi Z+ - (phi - 1) Z-``; ``r = ||Z~||_1 / ||Z+||_1``; ``Z^ = Z~ min(r, tau) / r``;
    ``Z = alpha Z^ + (1 - alpha) Z+``, with ``phi = scale`` and the L1 norm over the token's
    features (all heads), as the reference SDXL processor computes it.
    """
    guided = scale * positive - (scale - 1) * negative
    dims = (1, 3)    # (batch, heads, tokens, head_dim): one norm per token across heads
    norm_pos = positive.abs().sum(dims, keepdim=True)
    norm_guided = guided.abs().sum(dims, keepdim=True)
    # Z~ * min(r, tau) / r == Z~ * min(1, tau / r); written so that a zero Z~ stays finite
    factor = (tau * norm_pos / norm_guided.clamp_min(torch.finfo(guided.dtype).tiny)).clamp(max=1.0)
    return alpha * (guided * factor) + (1 - alpha) * positive


@attrs.define
class PAG(GuidanceProcessor):
    """Perturbed-attention guidance: Ahn et al., "Self-rectifying diffusion sampling with
    perturbed-attention guidance", ECCV 2024, arXiv:2403.17377.

    A second pass of the conditional branch with the self-attention map of ``layers`` replaced by
    the identity (``identity_attention``); then ``pred + scale * (x_c - x_perturbed)``, which is
    the paper's ``x_c + s (x_c - x~_c)`` alone and its ``x_u + w (x_c - x_u) + s (x_c - x~_c)``
    after CFG in the chain. Cost: +1 forward, batched with the others (2 per step alone, 3 with
    CFG). Defaults: ``scale = 3.0`` as diffusers' PAG pipelines (``pag_scale``); layers
    ``transformer_blocks.1.attn``, diffusers' transformer default ``"blocks.1"``. Joint attention
    (FLUX) returns ``v`` for the whole joint sequence, as diffusers' guider path does. ``layers =
    ()`` or ``scale = 0`` runs nothing and changes nothing.
    """

    scale: float = 3.0
    layers: tuple[str, ...] = attrs.field(default=("transformer_blocks.1.attn",), converter=tuple)
    start: float = 0.0
    stop: float = 1.0

    @property
    def branch(self) -> Branch:
        return Branch(f"pag[{','.join(self.layers)}]", cond="cond", layers=tuple(self.layers),
                      patch=identity_attention)

    def branches(self, step: StepInfo) -> list[Branch]:
        return [self.branch] if self.layers and self.scale != 0 else []

    def combine(self, pred: torch.Tensor, preds: dict[str, torch.Tensor], step: StepInfo) -> torch.Tensor:
        if not self.layers or self.scale == 0:
            return pred
        return pred + self.scale * (preds["cond"] - preds[self.branch.name])


@attrs.define
class NAG(GuidanceProcessor):
    """Normalized attention guidance: Chen, Bandyopadhyay, Zou & Song, "Normalized attention
    guidance: universal negative guidance for diffusion models", arXiv:2505.21179 (2025).

    Inside ``layers`` of the *conditional* branch, ``Z+`` is the layer's attention output and
    ``Z-`` the attention of the same queries over the keys and values of the ``negative`` branch
    (``uncond``: the negative prompt, or the null class), read from that branch's rows of the
    same forward; then ``nag_combine``. The final prediction is the patched conditional one, so
    NAG restores negative prompting for guidance-distilled models (FLUX.1-dev, ``cfg_scale = 1``).

    Cost: the negative branch is one extra batch of the same forward (2 per step alone); with CFG
    its ``uncond`` branch is shared, so NAG + CFG costs what CFG costs. Defaults from the
    reference code (ChenDarYen/Normalized-Attention-Guidance): ``scale`` (phi) 5 as its FLUX and
    SD3.5 examples, ``tau = 2.5``, ``alpha = 0.25`` (its FLUX processor; SDXL uses 0.5), every
    attention layer. Differences: the norm is L1 as in the paper (the reference FLUX processor
    uses L2); every query token of a layer is guided, text tokens of a joint-attention layer
    included (the reference guides the image tokens only); and the negative rows keep their own
    image stream instead of sharing the positive one.
    """

    scale: float = 5.0
    tau: float = 2.5
    alpha: float = 0.25
    layers: tuple[str, ...] = attrs.field(default=("*",), converter=tuple)
    negative: str = "uncond"
    start: float = 0.0
    stop: float = 1.0

    @property
    def negative_branch(self) -> Branch:
        return UNCOND if self.negative == UNCOND.cond else Branch(f"nag-{self.negative}", cond=self.negative)

    def _on(self) -> bool:
        return bool(self.layers) and self.scale != 1

    def branches(self, step: StepInfo) -> list[Branch]:
        return [self.negative_branch] if self._on() else []

    def patches(self, step: StepInfo) -> list[BranchPatch]:
        if not self._on():
            return []
        return [BranchPatch(self._patch, layers=tuple(self.layers), branch="cond",
                            context=self.negative_branch.name)]

    def _patch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend, *,
               context: AttentionContext) -> torch.Tensor:
        positive = attend(q, k, v)
        negative = context.attend(q, context.k, context.v)
        return nag_combine(positive, negative, self.scale, self.tau, self.alpha)


@attrs.define
class NAGPAG(GuidanceProcessor):
    """NAG-PAG (a diffcore method, no published reference): NAG's normalised extrapolation with PAG's
    identity attention as the negative, inside the conditional branch's own forward.

    In ``layers`` of the conditional branch: ``Z+ = softmax(q k^T / sqrt(d)) v``, ``Z- = v``
    (identity map), then ``nag_combine(Z+, Z-, phi = 1 + scale, tau, alpha)``, i.e. the
    ``Z+ + scale (Z+ - Z-)`` extrapolation, L1-normalised NAG-style and alpha-blended. No
    negative prompt and no extra forward pass: 1 forward per step, the same as no guidance (the
    patched layers compute attention once plus a few elementwise ops).

    Parameters: ``scale`` 0 to 10, default 3.0; ``layers`` default to a choice for FLUX.1 [dev]
    (``transformer_blocks.8/12/16.attn``), set them for other models; ``tau = 2.5`` and
    ``alpha = 0.25`` are NAG's FLUX defaults.
    """

    scale: float = 3.0
    tau: float = 2.5
    alpha: float = 0.25
    layers: tuple[str, ...] = attrs.field(
        default=("transformer_blocks.8.attn", "transformer_blocks.12.attn", "transformer_blocks.16.attn"), converter=tuple)
    start: float = 0.0
    stop: float = 1.0

    def patches(self, step: StepInfo) -> list[BranchPatch]:
        if not self.layers or self.scale == 0:
            return []
        return [BranchPatch(self._patch, layers=tuple(self.layers), branch="cond")]

    def _patch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend) -> torch.Tensor:
        return nag_combine(attend(q, k, v), identity_attention(q, k, v), 1 + self.scale, self.tau, self.alpha)
