"""The core's schedules, samplers and guidance, registered through the plugin hooks.

Only generic components live here; a family registers its named presets itself (FLUX.1 and
FLUX.2 register ``flux`` from ``flow_schedule`` and ``DynamicShiftConfig``: the same two objects,
so the second registration is a no-op).

No torch at import time: ``diffcore plugins`` and config validation read these config classes
without loading torch; the factories import the sampling modules when a component is built.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import attrs
from attrs import validators as v

from diffcore.registry import NoConfig

_positive = v.gt(0)
_unit = [v.ge(0.0), v.le(1.0)]


# -- schedules ----------------------------------------------------------------------------------

@attrs.frozen
class Timer:
    """A schedule component: ``sigmas(steps, *, seq_len=None)``, a descending float32 tensor
    ending in 0. ``seq_len`` (image tokens) matters only to resolution-dependent schedules."""

    config: Any
    function: Callable[[int, int | None], Any] = attrs.field(repr=False)

    def sigmas(self, steps: int, *, seq_len: int | None = None) -> Any:
        return self.function(steps, seq_len)


@attrs.frozen(kw_only=True)
class FlowConfig:
    """Flow matching, ``t = linspace(1, 0, steps + 1)`` shifted: statically by ``shift`` or, with
    ``dynamic``, by ``mu`` on the line through the anchor points ``(base_seq_len, base_shift)``
    and ``(max_seq_len, max_shift)`` at the image's token count (defaults: diffusers'
    ``FlowMatchEulerDiscreteScheduler``). ``train_steps = N`` spaces ``t`` down to the smallest
    of N discrete training sigmas instead of 0, as a discrete flow model's reference sampler does."""

    shift: float = attrs.field(default=1.0, validator=_positive)
    dynamic: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = attrs.field(default=256, validator=_positive)
    max_seq_len: int = attrs.field(default=4096, validator=_positive)
    train_steps: int = attrs.field(default=0, validator=v.ge(0))

    def __attrs_post_init__(self) -> None:
        if self.max_seq_len <= self.base_seq_len:
            raise ValueError(f"max_seq_len ({self.max_seq_len}) must be greater than "
                             f"base_seq_len ({self.base_seq_len})")


@attrs.frozen(kw_only=True)
class DynamicShiftConfig(FlowConfig):
    """The flow schedule with its resolution-dependent shift on: the config of families' presets
    (``flux``) that shift by the image size."""

    dynamic: bool = True


@attrs.frozen(kw_only=True)
class DDPMConfig:
    """A discrete DDPM model's own sigmas at spaced timesteps (diffusers' EulerDiscreteScheduler;
    Stable Diffusion 1.x / XL ship ``leading`` with ``steps_offset = 1``)."""

    spacing: Literal["leading", "trailing", "linspace"] = "leading"
    steps_offset: int = attrs.field(default=1, validator=v.ge(0))
    beta_start: float = attrs.field(default=0.00085, validator=_positive)
    beta_end: float = attrs.field(default=0.012, validator=_positive)
    train_steps: int = attrs.field(default=1000, validator=v.ge(2))

    def __attrs_post_init__(self) -> None:
        if self.beta_end <= self.beta_start:
            raise ValueError(f"beta_end ({self.beta_end}) must be greater than beta_start ({self.beta_start})")


@attrs.frozen(kw_only=True)
class SigmaRange:
    """Between ``sigma_min`` and ``sigma_max`` (default: the SD discrete model's table)."""

    sigma_min: float = attrs.field(default=0.0291672, validator=_positive)
    sigma_max: float = attrs.field(default=14.6146, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max ({self.sigma_max}) must be greater than sigma_min ({self.sigma_min})")


@attrs.frozen(kw_only=True)
class KarrasConfig(SigmaRange):
    rho: float = attrs.field(default=7.0, validator=_positive)


@attrs.frozen(kw_only=True)
class ExponentialConfig(SigmaRange):
    pass


@attrs.frozen(kw_only=True)
class BetaConfig(SigmaRange):
    alpha: float = attrs.field(default=0.6, validator=_positive)
    beta: float = attrs.field(default=0.6, validator=_positive)


def flow_schedule(config: FlowConfig, **_: Any) -> Timer:
    from diffcore.sampling import schedules

    def sigmas(steps: int, seq_len: int | None):
        mu = None
        if config.dynamic:
            if seq_len is None:
                raise ValueError("this schedule shifts with the image size (dynamic = true): pass seq_len, "
                                 "the number of latent tokens")
            mu = schedules.dynamic_shift_mu(seq_len, base_shift=config.base_shift, max_shift=config.max_shift,
                                            base_seq_len=config.base_seq_len, max_seq_len=config.max_seq_len)
        return schedules.flow_sigmas(steps, shift=config.shift, mu=mu, train_steps=config.train_steps)

    return Timer(config, sigmas)


def ddpm_schedule(config: DDPMConfig, **_: Any) -> Timer:
    from diffcore.sampling import schedules

    return Timer(config, lambda steps, seq_len: schedules.ddpm_sigmas(
        steps, spacing=config.spacing, steps_offset=config.steps_offset, beta_start=config.beta_start,
        beta_end=config.beta_end, train_steps=config.train_steps))


def karras_schedule(config: KarrasConfig, **_: Any) -> Timer:
    from diffcore.sampling import schedules

    return Timer(config, lambda steps, seq_len: schedules.karras_sigmas(
        steps, sigma_min=config.sigma_min, sigma_max=config.sigma_max, rho=config.rho))


def exponential_schedule(config: ExponentialConfig, **_: Any) -> Timer:
    from diffcore.sampling import schedules

    return Timer(config, lambda steps, seq_len: schedules.exponential_sigmas(
        steps, sigma_min=config.sigma_min, sigma_max=config.sigma_max))


def beta_schedule(config: BetaConfig, **_: Any) -> Timer:
    from diffcore.sampling import schedules

    return Timer(config, lambda steps, seq_len: schedules.beta_sigmas(
        steps, sigma_min=config.sigma_min, sigma_max=config.sigma_max, alpha=config.alpha, beta=config.beta))


def register_schedules(register: Callable[..., None]) -> None:
    register("flow", flow_schedule, config=FlowConfig,
             description="flow matching, linspace in t, static shift or shift by image size (dynamic, anchor points)")
    register("ddpm", ddpm_schedule, config=DDPMConfig,
             description="a discrete DDPM model's sigmas, leading / trailing / linspace timestep spacing")
    register("karras", karras_schedule, config=KarrasConfig, description="Karras et al. 2022, rho = 7")
    register("exponential", exponential_schedule, config=ExponentialConfig, description="uniform in log sigma")
    register("beta", beta_schedule, config=BetaConfig,
             description="Beta sampling (Lee et al. 2024), alpha = beta = 0.6")


# -- samplers -----------------------------------------------------------------------------------

@attrs.frozen(kw_only=True)
class AncestralConfig:
    """``eta`` scales the fresh noise per step: 0 is the deterministic sampler."""

    eta: float = attrs.field(default=1.0, validator=v.ge(0))


@attrs.frozen(kw_only=True)
class DDIMConfig:
    eta: float = attrs.field(default=0.0, validator=[v.ge(0), v.le(1)])


@attrs.frozen(kw_only=True)
class SDEConfig:
    eta: float = attrs.field(default=1.0, validator=v.ge(0))
    solver_type: Literal["midpoint", "heun"] = "midpoint"


def _sampler(name: str) -> Callable[..., Any]:
    def factory(config: Any, **_: Any) -> Callable[..., Any]:
        from diffcore.sampling import samplers

        fn = samplers.SAMPLERS[name]
        options = attrs.asdict(config) if attrs.fields(type(config)) else {}
        return functools.partial(fn, **options) if options else fn

    factory.__name__ = factory.__qualname__ = f"build_{name}"
    return factory


_SAMPLER_FACTORIES = {name: _sampler(name) for name in
                      ("euler", "heun", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde", "ddim")}


def register_samplers(register: Callable[..., None]) -> None:
    f = _SAMPLER_FACTORIES
    register("euler", f["euler"], config=NoConfig, description="Euler on the probability-flow ODE (first order)")
    register("heun", f["heun"], config=NoConfig, description="Heun's method (Karras et al. 2022), second order, "
                                                             "two model calls per step")
    register("dpmpp_2m", f["dpmpp_2m"], config=NoConfig, description="DPM-Solver++(2M), second-order multistep")
    register("euler_ancestral", f["euler_ancestral"], config=AncestralConfig,
             description="Euler steps with fresh noise each step (eta)")
    register("dpmpp_2m_sde", f["dpmpp_2m_sde"], config=SDEConfig,
             description="DPM-Solver++(2M) SDE, second-order multistep with noise (eta)")
    register("ddim", f["ddim"], config=DDIMConfig, description="DDIM (Song et al. 2021); eta 0 deterministic")


# -- guidance -----------------------------------------------------------------------------------

@attrs.frozen(kw_only=True)
class CFGConfig:
    """Classifier-free guidance ``uncond + scale * (cond - uncond)`` over ``[start, stop)``."""

    scale: float = attrs.field(default=4.0, validator=v.ge(0))
    start: float = attrs.field(default=0.0, validator=_unit)
    stop: float = attrs.field(default=1.0, validator=_unit)

    def __attrs_post_init__(self) -> None:
        if self.start >= self.stop:
            raise ValueError(f"start ({self.start}) must be less than stop ({self.stop})")


def cfg_guidance(config: CFGConfig, **_: Any) -> Any:
    from diffcore.sampling.cfg import CFG

    return CFG(scale=config.scale, start=config.start, stop=config.stop)


def register_guidance(register: Callable[..., None]) -> None:
    register("cfg", cfg_guidance, config=CFGConfig, description="classifier-free guidance (Ho & Salimans 2022)")
