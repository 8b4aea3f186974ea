"""A guidance processor written against ``diffcore.api`` only: CFG whose scale decays over the
schedule, strong while the layout forms and gentle on the details.

    scale(t) = 1 + (scale - 1) * (1 - progress) ** power

``progress`` is the fraction of the schedule done (``StepInfo.progress``); ``power = 0`` is plain
CFG. Like CFG it runs the ``uncond`` branch, batched into the same forward.

This module is imported whenever diffcore loads its plugins, so it stays light: attrs and the
api, nothing that loads model weights.
"""

import attrs
from diffcore.api import UNCOND, GuidanceProcessor, hookimpl


@attrs.frozen
class ScheduledCFGConfig:
    """The job file's ``[[guidance]]`` table, checked by the validators below."""

    scale: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    power: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    start: float = 0.0
    stop: float = 1.0


@attrs.define
class ScheduledCFG(GuidanceProcessor):
    scale: float = 5.0
    power: float = 1.0
    start: float = 0.0
    stop: float = 1.0

    def scale_at(self, step):
        return 1 + (self.scale - 1) * (1 - step.progress) ** self.power

    def branches(self, step):
        return [] if self.scale_at(step) == 1 else [UNCOND]

    def combine(self, pred, preds, step):
        w = self.scale_at(step)
        if w == 1:
            return pred
        uncond = preds[UNCOND.name]
        return uncond + w * (pred - uncond)


def build(config):
    return ScheduledCFG(scale=config.scale, power=config.power, start=config.start, stop=config.stop)


@hookimpl
def register_guidance(register):
    register("scheduled-cfg", build, config=ScheduledCFGConfig,
             description="CFG with a scale decaying from `scale` to 1 over the schedule")
