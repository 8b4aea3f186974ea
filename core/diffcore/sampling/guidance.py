"""The guidance chain's interface: processors declare branches, then combine predictions.

A *branch* is one forward pass of the network: which conditioning it uses (``cond``,
``uncond`` or any key the model bundle provides) and optionally an attention patch on named
layers. The engine runs every branch the active processors ask for, batching branches into one
forward where shapes allow, and hands each processor the raw predictions (the network's own
output space: velocity, epsilon or v) to combine. Processors run in order; each gets the
previous one's result as ``pred``.

A processor may also patch the attention of a branch that runs anyway (``patches``): the
``cond`` branch itself, or a branch another processor declared. That costs no forward pass;
NAG-PAG works this way, and NAG reads the negative branch's rows through ``context``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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


@attrs.frozen
class BranchPatch:
    """An attention patch on a branch that runs anyway (no extra forward pass).

    ``branch``: the branch whose rows are patched (``cond``, or one any active processor declares).
    ``layers``: attention layers (names, aliases or patterns; empty = every attention layer).
    ``context``: another branch whose rows the patch sees as ``context=AttentionContext(q, k, v,
    attend)``; the engine then runs both branches in one forward, and it is an error when their
    conditioning cannot share one. Patches on the same rows and layer compose in processor order.
    """

    patch: AttentionPatch = attrs.field(eq=False)
    layers: tuple[str, ...] = ()
    branch: str = "cond"
    context: str | None = None


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
    # conditioning kwargs per branch key ("cond", "uncond", ...), as the model bundle gave them
    conditions: Mapping[str, Mapping[str, Any]] = attrs.Factory(dict)
    # the model bundle being sampled: its ``sequence_condition`` / ``pooled_condition`` name what
    # a branch's conditioning holds, without guessing the family's keys
    bundle: Any = None

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

    def patches(self, step: StepInfo) -> list[BranchPatch]:
        """Attention patches on branches that run anyway (``cond`` or declared ones) this step."""
        return []

    def combine(self, pred: torch.Tensor, preds: dict[str, torch.Tensor], step: StepInfo) -> torch.Tensor:
        """The guided raw prediction from ``pred`` (so far) and every branch's prediction."""
        return pred
