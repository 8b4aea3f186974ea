"""Skip-layer guidance (SLG) for the MMDiT, as a processor of the core's guidance chain.

SLG (Stability AI, SD3.5-medium release; diffusers' ``skip_guidance_layers``) runs one more
forward of the conditional branch with whole joint blocks left out and pushes the prediction
away from it: ``pred + scale * (cond - cond_without_blocks)``. After CFG in the chain that is
diffusers' ``uncond + w (cond - uncond) + s (cond - skipped)``.

The extra branch is an ordinary ``Branch`` whose conditioning key names the blocks
(``cond|skip=7,8,9``): ``SD3Conditions`` answers such a key with ``cond``'s kwargs plus
``skip_layers``, so the engine runs it as its own forward (the skipped blocks differ, so it
cannot share a batch with the others) and no core change is needed.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from diffcore.api import Branch, GuidanceProcessor, StepInfo

SKIP = "|skip="


def skip_key(base: str, layers: tuple[int, ...]) -> str:
    """The conditioning key of branch ``base`` with ``layers`` skipped: ``cond|skip=7,8,9``."""
    return f"{base}{SKIP}{','.join(str(i) for i in layers)}"


class SD3Conditions(dict):
    """Conditioning per branch key (``cond``, ``uncond``), and the derived ``<key>|skip=i,j``
    keys: the same kwargs with ``skip_layers=(i, j)``. Iterating lists the real keys only."""

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key) or self._derived(key) is not None

    def __missing__(self, key: str) -> dict[str, Any]:
        derived = self._derived(key)
        if derived is None:
            raise KeyError(key)
        return derived

    def _derived(self, key: object) -> dict[str, Any] | None:
        if not isinstance(key, str) or SKIP not in key:
            return None
        base, layers = key.split(SKIP, 1)
        if not super().__contains__(base) or not layers.replace(",", "").isdigit():
            return None
        return {**self[base], "skip_layers": tuple(int(i) for i in layers.split(","))}


@attrs.define
class SkipLayerGuidance(GuidanceProcessor):
    """``pred + scale * (cond - cond with blocks `layers` skipped)`` over ``[start, stop)`` of the
    schedule. Defaults as diffusers' StableDiffusion3Pipeline and Stability's SD3.5-medium recipe:
    blocks 7, 8, 9, scale 2.8, from 0.01 to 0.2 (the reference uses 2.5 with CFG 4). diffusers
    opens the window at both ends (``start * n < i < stop * n``): the two differ only on a step
    ``i == start * n`` exactly, which diffusers leaves out. Cost: one more forward on the steps
    where it is active."""

    scale: float = 2.8
    layers: tuple[int, ...] = attrs.field(default=(7, 8, 9), converter=tuple)
    start: float = 0.01
    stop: float = 0.2

    @property
    def branch(self) -> Branch:
        return Branch(f"slg[{','.join(map(str, self.layers))}]", cond=skip_key("cond", self.layers))

    def branches(self, step: StepInfo) -> list[Branch]:
        return [self.branch] if self.layers and self.scale != 0 else []

    def combine(self, pred: torch.Tensor, preds: dict[str, torch.Tensor], step: StepInfo) -> torch.Tensor:
        if not self.layers or self.scale == 0:
            return pred
        return pred + self.scale * (preds["cond"] - preds[self.branch.name])

