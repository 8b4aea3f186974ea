"""The ``learned`` guidance processor: a guidance model's correction added to the prediction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from diffcore.api import GuidanceProcessor, StepInfo


def conditioning_inputs(cond: Mapping[str, Any], txt_key: str | None = "txt",
                        vec_key: str | None = "auto") -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(txt, vec)`` for a guidance model from a branch's conditioning kwargs.

    ``vec_key = "auto"``: the pooled ``vec`` of text families (FLUX.1), else the class labels
    ``y`` of class-conditional ones (DiT), else None. A missing key gives None."""
    txt = cond.get(txt_key) if txt_key else None
    if vec_key == "auto":
        vec = cond.get("vec", cond.get("y"))
    else:
        vec = cond.get(vec_key) if vec_key else None
    return (txt if torch.is_tensor(txt) else None), (vec if torch.is_tensor(vec) else None)


@attrs.define
class LearnedGuidance(GuidanceProcessor):
    """``pred + guidance_scale * model(x, pred, txt, vec, sigma, step)`` each step (seed 000).

    ``model`` is any ``BaseGuidanceModel``; it reads the ``cond`` branch's conditioning through
    ``txt_key`` / ``vec_key`` (see ``conditioning_inputs``). ``requires_grad``: run the model with
    autograd on, even inside a sampler's ``no_grad``, so each step's correction carries a graph;
    to back-propagate through a whole run, sample with ``diffcore_guidance.training.euler_with_grad``
    (the core's samplers run under ``no_grad``, as k-diffusion's). Off (the default), the correction
    is computed without a graph. No extra forward pass of the sampling model.
    """

    model: Any = None
    guidance_scale: float = 1.0
    requires_grad: bool = False
    txt_key: str | None = "txt"
    vec_key: str | None = "auto"
    start: float = 0.0
    stop: float = 1.0

    def combine(self, pred: torch.Tensor, preds: dict[str, torch.Tensor], step: StepInfo) -> torch.Tensor:
        if self.model is None or self.guidance_scale == 0:
            return pred
        self._place(pred.device)
        txt, vec = conditioning_inputs(step.conditions.get("cond", {}), self.txt_key, self.vec_key)
        with torch.enable_grad() if self.requires_grad else torch.no_grad():
            correction = self.model(step.x, pred, txt, vec, step.sigma, step.step)
        return pred + self.guidance_scale * correction.to(pred.dtype)

    def _place(self, device: torch.device) -> None:
        first = next(self.model.parameters(), None)
        if first is not None and first.device != device:
            self.model.to(device)
