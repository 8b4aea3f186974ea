"""The core's trainers, registered through ``register_trainers``. Imports no torch.

A trainer factory is ``factory(config, bundle)`` and returns an object with
``trainable_parameters()`` and ``loss(bundle, batch, generator) -> scalar tensor``.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
from attrs import validators as v


@attrs.frozen
class FullConfig:
    """Objective settings (the objective itself follows the bundle's ``prediction_type``).

    ``timestep_sampling``: ``uniform``; ``logit-normal`` (``logit_mean``, ``logit_std``; SD3 uses
    0 and 1); ``shifted`` (``shift`` s maps t to s t / (1 + (s - 1) t); s > 1 favours high noise).
    Epsilon / v models draw their discrete timestep as ``floor(t * len(bundle.sigma_table))``.
    ``cond_dropout``: rate at which ``bundle.training_inputs`` swaps in the unconditional input.
    """

    timestep_sampling: Literal["uniform", "logit-normal", "shifted"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = attrs.field(default=1.0, validator=v.gt(0))
    shift: float = attrs.field(default=1.0, validator=v.gt(0))
    cond_dropout: float = attrs.field(default=0.1, validator=[v.ge(0), v.le(1)])


def build_full(config: FullConfig, bundle: Any) -> Any:
    from diffcore.training.trainers import FullTrainer

    return FullTrainer(config, bundle)


def register_trainers(register):
    register("full", build_full, config=FullConfig,
             description="full fine-tune of the network on its objective (flow / epsilon / v), label dropout for CFG")
