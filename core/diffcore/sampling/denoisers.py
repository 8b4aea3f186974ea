"""Denoisers: a network's raw prediction turned into the x0 estimate every sampler works with.

One convention, ``x = alpha(sigma) * x0 + sigma * noise``:

- flow (Lipman et al. 2023, rectified flow): ``alpha = 1 - sigma``; the network sees ``x`` and
  ``sigma`` as they are and predicts the velocity ``v = noise - x0``, so ``x0 = x - sigma * v``.
- epsilon / v (Karras et al. 2022, table 1, variance-exploding form of a DDPM model):
  ``alpha = 1``; the network sees ``c_in * x`` with ``c_in = 1 / sqrt(sigma^2 + 1)`` (the
  DDPM-scaled sample) and, for discrete-time models, the fractional training timestep whose
  sigma is ``sigma`` (k-diffusion's ``DiscreteSchedule.sigma_to_t``). Epsilon:
  ``x0 = x - sigma * eps``. v (Salimans & Ho 2022): ``x0 = c_skip * x + c_out * v`` with
  ``c_skip = 1 / (sigma^2 + 1)``, ``c_out = -sigma / sqrt(sigma^2 + 1)``.

Guidance combines raw predictions, so each denoiser converts both ways (``to_denoised``,
``from_denoised``); samplers only call the denoiser and its ``alpha``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

PREDICTION_TYPES = ("flow", "epsilon", "v")

Forward = Callable[..., torch.Tensor]   # forward(x_in, time, **cond) -> raw prediction


def alpha(sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The signal coefficient ``alpha(sigma)`` of a parametrisation."""
    sigma = torch.as_tensor(sigma)
    if prediction_type == "flow":
        return 1 - sigma
    if prediction_type in ("epsilon", "v"):
        return torch.ones_like(sigma)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor, prediction_type: str) -> torch.Tensor:
    """``alpha(sigma) * x0 + sigma * noise``: a clean sample noised to ``sigma`` (img2img, training)."""
    sigma = _expand(torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device), x0)
    return alpha(sigma, prediction_type) * x0 + sigma * noise


def _expand(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample (batch,) sigma, broadcastable against ``x``."""
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim)) if sigma.ndim else sigma


class Denoiser:
    """``denoiser(x, sigma, **cond) -> x0`` around a network's ``forward(x_in, time, **cond)``.

    ``sigma_table``: for discrete-time models, the training sigmas indexed by timestep; the
    network then gets that fractional timestep instead of sigma.
    """

    prediction_type = ""

    def __init__(self, forward: Forward, sigma_table: torch.Tensor | None = None):
        self.forward = forward
        self.log_sigmas = None if sigma_table is None else torch.as_tensor(sigma_table, dtype=torch.float64).log()

    def alpha(self, sigma: torch.Tensor) -> torch.Tensor:
        return alpha(sigma, self.prediction_type)

    def inputs(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the network sees for noisy ``x`` at (per-sample) ``sigma``: its input and its time."""
        return x, self.time(sigma)

    def time(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma if self.log_sigmas is None else sigma_to_t(sigma, self.log_sigmas)

    def to_denoised(self, x: torch.Tensor, sigma: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def from_denoised(self, x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        x_in, time = self.inputs(x, sigma)
        return self.to_denoised(x, sigma, self.forward(x_in, time, **cond))


class FlowDenoiser(Denoiser):
    """Velocity prediction on the straight path ``x = (1 - sigma) x0 + sigma noise``."""

    prediction_type = "flow"

    def to_denoised(self, x, sigma, raw):
        return x - _expand(sigma, x) * raw

    def from_denoised(self, x, sigma, x0):
        return (x - x0) / _expand(sigma, x)


class EpsilonDenoiser(Denoiser):
    """Noise prediction, Ho et al. 2020, driven in k-diffusion's variance-exploding form."""

    prediction_type = "epsilon"

    def inputs(self, x, sigma):
        # a division, as diffusers' scale_model_input: rsqrt-and-multiply rounds differently, and a
        # UNet turns that last-bit difference into ~1e-6 of its output (4e-5 after 4 CFG steps)
        return x / _expand((sigma ** 2 + 1).sqrt(), x), self.time(sigma)

    def to_denoised(self, x, sigma, raw):
        return x - _expand(sigma, x) * raw

    def from_denoised(self, x, sigma, x0):
        return (x - x0) / _expand(sigma, x)


class VDenoiser(EpsilonDenoiser):
    """v prediction, ``v = (noise - sigma x0) / sqrt(sigma^2 + 1)`` (Salimans & Ho 2022, "Progressive
    Distillation"), in the variance-exploding form."""

    prediction_type = "v"

    def to_denoised(self, x, sigma, raw):
        s = _expand(sigma, x)
        return x / (s ** 2 + 1) - raw * s / (s ** 2 + 1).sqrt()

    def from_denoised(self, x, sigma, x0):
        s = _expand(sigma, x)
        return (x / (s ** 2 + 1) - x0) * (s ** 2 + 1).sqrt() / s


DENOISERS = {"flow": FlowDenoiser, "epsilon": EpsilonDenoiser, "v": VDenoiser}


def make_denoiser(bundle: Any) -> Denoiser:
    """The denoiser for a ``ModelBundle``: its ``prediction_type``, ``forward`` and ``sigma_table``."""
    kind = bundle.prediction_type
    if kind not in DENOISERS:
        raise ValueError(f"unknown prediction_type {kind!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    return DENOISERS[kind](bundle.forward, getattr(bundle, "sigma_table", None))


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional timestep of ``sigma`` in an ascending table of log-sigmas, linear in log-sigma
    (k-diffusion ``DiscreteSchedule.sigma_to_t``); clamped to the table's ends."""
    dtype = sigma.dtype if sigma.dtype == torch.float64 else torch.float32
    table = log_sigmas.to(sigma.device, dtype)
    log_sigma = sigma.to(dtype).clamp(min=1e-10).log()
    low = (torch.searchsorted(table, log_sigma.reshape(-1), right=True) - 1).clamp(0, len(table) - 2)
    lo, hi = table[low], table[low + 1]
    w = ((log_sigma.reshape(-1) - lo) / (hi - lo)).clamp(0, 1)
    return (low + w).reshape(sigma.shape)


def t_to_sigma(t: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Inverse of ``sigma_to_t``: the table's sigma at a fractional timestep, linear in log-sigma."""
    table = log_sigmas.to(t.device, torch.float64)
    t = t.to(torch.float64).clamp(0, len(table) - 1)
    low = t.floor().long().clamp(max=len(table) - 2)
    w = t - low
    return ((1 - w) * table[low] + w * table[low + 1]).exp()
