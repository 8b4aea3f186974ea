"""The guidance chain's interface: processors declare branches, then combine predictions.

A *branch* is one forward pass of the network: which conditioning it uses (``cond``,
``uncond`` or any key the model bundle provides) and optionally an attention patch on named
layers. The engine runs every branch the active processors ask for, batching branches into one
forward where shapes allow, and hands each processor the raw predictions (the network's own
output space: velocity, epsilon or v) to combine. Processors run in order; each gets the
previous one's result as ``pred``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch

from diffcore.nn.attention import AttentionPatch


@attrs.frozen
class Branch:
    """A forward pass a processor needs. ``name`` keys the prediction in ``preds``."""

    name: str
    cond: str = "cond"
    layers: tuple[str, ...] = ()          # attention layers to patch (family names or aliases)
    patch: AttentionPatch | None = attrs.field(default=None, eq=False)


COND = Branch("cond")
UNCOND = Branch("uncond", cond="uncond")


@attrs.define
class StepInfo:
    """What a processor may look at in one step."""

    x: torch.Tensor
    sigma: torch.Tensor            # shape (batch,)
    step: int
    num_steps: int
    prediction_type: str           # "flow" | "epsilon" | "v"
    to_denoised: Callable[[torch.Tensor], torch.Tensor]   # raw prediction -> x0 estimate
    from_denoised: Callable[[torch.Tensor], torch.Tensor] # x0 estimate -> raw prediction
    extra: dict[str, Any] = attrs.Factory(dict)

    @property
    def progress(self) -> float:
        """Fraction of the schedule done before this step, in [0, 1)."""
        return self.step / self.num_steps


@attrs.define
class GuidanceProcessor:
    """Base class: the identity processor active over ``[start, stop)`` of the schedule."""

    start: float = 0.0
    stop: float = 1.0

    def active(self, step: StepInfo) -> bool:
        return self.start <= step.progress < self.stop

    def branches(self, step: StepInfo) -> list[Branch]:
        """Branches needed this step besides ``cond`` (which always runs)."""
        return []

    def combine(self, pred: torch.Tensor, preds: dict[str, torch.Tensor], step: StepInfo) -> torch.Tensor:
        """The guided raw prediction from ``pred`` (so far) and every branch's prediction."""
        return pred
