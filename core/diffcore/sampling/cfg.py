"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance")."""

from __future__ import annotations

import attrs
import torch

from diffcore.sampling.guidance import UNCOND, Branch, GuidanceProcessor, StepInfo


@attrs.define
class CFG(GuidanceProcessor):
    """``uncond + scale * (pred - uncond)`` over ``[start, stop)`` of the schedule.

    Combined in the network's raw space (velocity, epsilon or v); the three are affine in x0 at
    a fixed ``x`` and sigma, so this is the same guidance as on the x0 estimates. ``scale == 1``
    is the conditional prediction alone and runs no unconditional branch.
    """

    scale: float = 4.0
    start: float = 0.0
    stop: float = 1.0

    def branches(self, step: StepInfo) -> list[Branch]:
        return [] if self.scale == 1 else [UNCOND]

    def combine(self, pred: torch.Tensor, preds: dict[str, torch.Tensor], step: StepInfo) -> torch.Tensor:
        if self.scale == 1:
            return pred
        uncond = preds[UNCOND.name]
        return uncond + self.scale * (pred - uncond)
