"""The ``learned`` guidance processor: a guidance model's correction added to the prediction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from diffcore.api import GuidanceProcessor, PluginError, StepInfo


def conditioning_inputs(bundle: Any, cond: Mapping[str, Any], txt_key: str | None = "auto",
                       vec_key: str | None = "auto") -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(txt, vec)`` for a guidance model from a branch's conditioning kwargs.

    ``"auto"`` asks the model bundle: ``sequence_condition`` (text tokens) for ``txt``,
    ``pooled_condition`` (FLUX.1's pooled CLIP vector, DiT's class labels) for ``vec``. Another
    string reads that key of the conditioning; None (or a missing key) gives None."""
    if "auto" in (txt_key, vec_key) and bundle is None:
        raise PluginError("txt_key / vec_key = \"auto\" asks the model bundle what its conditioning holds, but "
                          "this step has no bundle (StepInfo.bundle); name the keys instead")
    txt = bundle.sequence_condition(cond) if txt_key == "auto" else (cond.get(txt_key) if txt_key else None)
    vec = bundle.pooled_condition(cond) if vec_key == "auto" else (cond.get(vec_key) if vec_key else None)
    return (txt if torch.is_tensor(txt) else None), (vec if torch.is_tensor(vec) else None)


@attrs.define
class LearnedGuidance(GuidanceProcessor):
    """``pred + guidance_scale * model(x, pred, txt, vec, sigma, step)`` each step.

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
    txt_key: str | None = "auto"
    vec_key: str | None = "auto"
    start: float = 0.0
    stop: float = 1.0

    def combine(self, pred: torch.Tensor, preds: dict[str, torch.Tensor], step: StepInfo) -> torch.Tensor:
        if self.model is None or self.guidance_scale == 0:
            return pred
        self._place(pred.device)
        txt, vec = conditioning_inputs(step.bundle, step.conditions.get("cond", {}), self.txt_key, self.vec_key)
        with torch.enable_grad() if self.requires_grad else torch.no_grad():
            correction = self.model(step.x, pred, txt, vec, step.sigma, step.step)
        return pred + self.guidance_scale * correction.to(pred.dtype)

    def _place(self, device: torch.device) -> None:
        first = next(self.model.parameters(), None)
        if first is not None and first.device != device:
            self.model.to(device)
