"""Prediction-level guidance: APG and CFG-Zero*, drop-in alternatives to the core's CFG.

Both need the ``uncond`` branch (one extra batch of the same forward, as CFG) and combine the two
predictions; neither touches the network. Use them *instead of* CFG (``cfg_scale = 1`` in a
generate job), not after it.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from diffcore.api import UNCOND, Branch, GuidanceProcessor, StepInfo


def _per_sample(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, t.ndim))


@attrs.define
class APG(GuidanceProcessor):
    """Adaptive projected guidance: Sadat, Hilliges & Weber, "Eliminating oversaturation and
    artifacts of high guidance scales in diffusion models", ICLR 2025, arXiv:2410.02416.

    With ``x_c`` the conditional and ``x_u`` the unconditional prediction, ``D = x_c - x_u``:

    1. reverse momentum: ``D <- D + beta * D_avg``, ``D_avg`` the running average of
       the previous steps (``momentum`` = beta; the paper uses beta < 0);
    2. rescaling: ``D <- D * min(1, r / ||D||_2)``, per sample (``norm_threshold`` = r,
       0 turns it off);
    3. projection: ``D_par = (<D, x_c> / ||x_c||^2) x_c``, ``D_orth = D - D_par``;
    4. ``x = x_c + (scale - 1) * (D_orth + eta * D_par)`` (the paper's pseudo-code).

    With ``eta = 1``, ``r = 0`` and no momentum this is CFG. Defaults: ``eta = 0`` as the paper
    recommends (the parallel part is what oversaturates); ``r = 15`` is diffusers'
    ``AdaptiveProjectedGuidance`` default (the paper tunes r per model); ``beta = -0.5`` a
    reverse momentum in the paper's range (stable-diffusion.cpp PR #593 recommends -0.5).
    ``space = "denoised"`` applies the update to the x0 estimates, as the paper does;
    ``"raw"`` to the network output (velocity / epsilon), as diffusers does.

    State: the momentum average, kept per schedule step so that combining a step again (a Heun
    corrector, the conformance check) gives the same result; step 0 starts a new run.
    """

    scale: float = 4.0
    eta: float = 0.0
    norm_threshold: float = 15.0
    momentum: float = -0.5
    space: str = "denoised"
    start: float = 0.0
    stop: float = 1.0
    _state: dict[str, Any] = attrs.field(factory=dict, init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if self.space not in ("denoised", "raw"):
            raise ValueError(f"APG space must be 'denoised' or 'raw', got {self.space!r}")

    def branches(self, step: StepInfo) -> list[Branch]:
        return [] if self.scale == 1 else [UNCOND]

    def combine(self, pred: torch.Tensor, preds: dict[str, torch.Tensor], step: StepInfo) -> torch.Tensor:
        if self.scale == 1:
            return pred
        uncond = preds[UNCOND.name]
        if self.space == "denoised":
            cond, uncond = step.to_denoised(pred), step.to_denoised(uncond)
        else:
            cond = pred
        dims = _per_sample(cond)
        diff = self._with_momentum(cond - uncond, step)
        if self.norm_threshold > 0:
            norm = diff.norm(p=2, dim=dims, keepdim=True)
            diff = diff * (self.norm_threshold / norm.clamp_min(1e-12)).clamp(max=1.0)
        # the projection in float64: <D, x_c> sums millions of terms for large latents
        d64, c64 = diff.double(), cond.double()
        parallel = (d64 * c64).sum(dims, keepdim=True) / (c64 * c64).sum(dims, keepdim=True).clamp_min(1e-30) * c64
        update = (d64 - parallel + self.eta * parallel).to(cond.dtype)
        guided = cond + (self.scale - 1) * update
        return step.from_denoised(guided) if self.space == "denoised" else guided

    def _with_momentum(self, diff: torch.Tensor, step: StepInfo) -> torch.Tensor:
        if self.momentum == 0:
            return diff
        state = self._state
        if not state or step.step == 0 or step.step < state["step"] or state["shape"] != diff.shape:
            previous = None                        # a new sampling run
        elif step.step == state["step"]:
            previous = state["previous"]           # the same step again
        else:
            previous = state["average"]
        average = diff if previous is None else diff + self.momentum * previous
        self._state = {"step": step.step, "shape": diff.shape, "previous": previous, "average": average.detach()}
        return average


@attrs.define
class CFGZeroStar(GuidanceProcessor):
    """CFG-Zero*: Fan, Zheng, Zhang & Ding, "CFG-Zero*: Improved classifier-free guidance for
    flow matching models", arXiv:2503.18886 (2025).

    - optimised scale: per sample ``s* = <v_c, v_u> / ||v_u||^2`` and
      ``v = s* v_u + scale * (v_c - s* v_u)``;
    - zero-init: the first ``zero_init_steps`` steps output zero velocity, i.e. the
      sample is left as it is. Default 1 step, the reference code's ``zero_steps = 0`` (first step
      only) and diffusers' ``zero_init_steps = 1``; the paper suggests the first ~4% of steps.

    Combined in the raw output space (the paper's velocity). "Zero velocity" is written
    ``from_denoised(x)`` (the prediction whose x0 estimate is x itself), which is exactly 0 for
    flow models and the same standing-still step for epsilon / v models. ``scale`` defaults to
    4.0 as the core's CFG; the paper sweeps it per model.
    """

    scale: float = 4.0
    zero_init_steps: int = 1
    start: float = 0.0
    stop: float = 1.0

    def branches(self, step: StepInfo) -> list[Branch]:
        return [] if self.scale == 1 or step.step < self.zero_init_steps else [UNCOND]

    def combine(self, pred: torch.Tensor, preds: dict[str, torch.Tensor], step: StepInfo) -> torch.Tensor:
        if step.step < self.zero_init_steps:
            return step.from_denoised(step.x).to(pred.dtype)
        if self.scale == 1:
            return pred
        uncond = preds[UNCOND.name]
        c, u = pred.flatten(1).float(), uncond.flatten(1).float()
        s_star = (c * u).sum(1) / (u * u).sum(1).clamp_min(1e-8)
        s_star = s_star.to(pred.dtype).reshape(-1, *([1] * (pred.ndim - 1)))
        scaled = s_star * uncond
        return scaled + self.scale * (pred - scaled)
