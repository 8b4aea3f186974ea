"""Integrators, in k-diffusion's style: ``sampler(model, x, sigmas, *, extra_args, callback,
disable, generator) -> x``.

``model(x, sigma, **extra_args)`` returns the x0 estimate ("denoised") for
``x = alpha(sigma) * x0 + sigma * noise`` and ``model.alpha(sigma)`` gives alpha: 1 for
variance-exploding (epsilon / v) models, ``1 - sigma`` for flow matching. Samplers never see
the parametrisation.

- Euler and Heun step the probability-flow ODE ``dx/dsigma = (x - denoised) / sigma``, which is
  exact for every ``alpha`` with ``alpha - sigma * alpha' = 1``: both conventions.
- The others are exponential integrators in the half-log-SNR ``lambda = log(alpha / sigma)``
  (Lu et al.), exact for any alpha. A flow schedule starting at sigma = 1 has ``alpha = 0``,
  ``lambda = -inf``: ``exp(-h) = 0`` there and every formula stays finite; a final sigma of 0
  (``lambda = +inf``) is handled the same way.

With ``alpha = 1`` every formula reduces algebraically to k-diffusion's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import trange

Callback = Callable[[dict[str, Any]], None]


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise like ``x``, drawn on the generator's device so seeds match across devices."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _lambda(model: Any, sigma: torch.Tensor) -> torch.Tensor:
    """Half-log-SNR ``log(alpha / sigma)``: -inf where alpha = 0, +inf where sigma = 0."""
    return model.alpha(sigma).log() - sigma.log()


def _report(callback: Callback | None, x, i, sigmas, denoised) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})


@torch.no_grad()
def euler(model, x, sigmas, *, extra_args=None, callback=None, disable=None, generator=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, "Elucidating the Design
    Space of Diffusion-Based Generative Models", algorithm 1 without the Heun correction)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas, denoised)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def heun(model, x, sigmas, *, extra_args=None, callback=None, disable=None, generator=None):
    """Heun's second-order method (Karras et al. 2022, algorithm 1, no churn): an Euler step,
    then the average of the slopes at both ends; the last step to sigma = 0 stays Euler."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas, denoised)
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = (x_2 - denoised_2) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def dpmpp_2m(model, x, sigmas, *, extra_args=None, callback=None, disable=None, generator=None):
    """DPM-Solver++(2M), the multistep second-order data-prediction solver (Lu et al. 2022,
    "DPM-Solver++", algorithm 2): ``x' = (sigma'/sigma) x + alpha' (1 - e^-h) D``, with ``D``
    extrapolated linearly in lambda from the last two denoised. First and last steps are
    first order."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas, denoised)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        h = _lambda(model, sigma_next) - _lambda(model, sigma)
        if old_denoised is None or sigma_next == 0:
            denoised_d = denoised
        else:
            r = h_last / h   # a previous step from alpha = 0 has h_last = inf: plain first order
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - model.alpha(sigma_next) * torch.expm1(-h) * denoised_d
        old_denoised, h_last = denoised, h
    return x


def ancestral_step(model: Any, sigma: torch.Tensor, sigma_next: torch.Tensor,
                   eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigma_down, sigma_up)``: the deterministic target and the fresh noise of an ancestral step.

    k-diffusion's ``get_ancestral_step``, ``sigma_up = min(sigma', eta sqrt(sigma'^2 (sigma^2 -
    sigma'^2) / sigma^2))``, taken in the variance-exploding coordinates ``x / alpha``,
    ``sigma / alpha`` and scaled back by ``alpha'``: ``sigma_up = sigma' min(1, eta sqrt(1 -
    e^(-2h)))``, ``sigma_down^2 = sigma'^2 - sigma_up^2``, so the result has noise level sigma'.
    """
    if not eta:
        return sigma_next, torch.zeros_like(sigma_next)
    ratio = sigma_next * model.alpha(sigma) / (sigma * model.alpha(sigma_next))   # e^-h, 0 when alpha = 0
    sigma_up = sigma_next * (eta * (1 - ratio ** 2).clamp(min=0).sqrt()).clamp(max=1)
    return (sigma_next ** 2 - sigma_up ** 2).clamp(min=0).sqrt(), sigma_up


@torch.no_grad()
def euler_ancestral(model, x, sigmas, *, extra_args=None, callback=None, disable=None, generator=None, eta=1.0):
    """Ancestral sampling with Euler steps (k-diffusion ``sample_euler_ancestral``; Ho et al. 2020
    when eta = 1): step deterministically to ``sigma_down``, then add noise up to ``sigma_next``.
    The Euler step is DDIM's ``alpha' D + sigma_down * eps``, which for flow models keeps the
    signal coefficient at ``alpha(sigma_next)``."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas, denoised)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_down, sigma_up = ancestral_step(model, sigma, sigma_next, eta)
        eps = (x - model.alpha(sigma) * denoised) / sigma
        x = model.alpha(sigma_next) * denoised + sigma_down * eps
        if sigma_next > 0 and eta:
            x = x + _noise(x, generator) * sigma_up
    return x


@torch.no_grad()
def ddim(model, x, sigmas, *, extra_args=None, callback=None, disable=None, generator=None, eta=0.0):
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12): the predicted x0,
    the direction pointing to x_t and fresh noise of std ``eta * sigma_t`` (eq. 16), written in
    half-log-SNR: ``s = eta sigma' sqrt(1 - e^(-2h))``. eta = 0 is deterministic, eta = 1 is
    DDPM's ancestral sampler."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas, denoised)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        alpha, alpha_next = model.alpha(sigma), model.alpha(sigma_next)
        eps = (x - alpha * denoised) / sigma
        x = alpha_next * denoised
        if sigma_next > 0:
            ratio = (sigma_next * alpha) / (sigma * alpha_next)
            s = (eta * sigma_next * (1 - ratio ** 2).clamp(min=0).sqrt()).clamp(max=sigma_next)
            x = x + (sigma_next ** 2 - s ** 2).clamp(min=0).sqrt() * eps
            if eta:
                x = x + s * _noise(x, generator)
    return x


@torch.no_grad()
def dpmpp_2m_sde(model, x, sigmas, *, extra_args=None, callback=None, disable=None, generator=None,
                 eta=1.0, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++", section 5; k-diffusion
    ``sample_dpmpp_2m_sde``): the multistep data-prediction solver of the SDE whose noise is
    scaled by eta (0: the ODE). ``solver_type`` "midpoint" or "heun" picks the second-order term."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    old_denoised, h_last = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas, denoised)
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        alpha_next = model.alpha(sigma_next)
        if sigma_next == 0:
            x = alpha_next * denoised
        else:
            h = _lambda(model, sigma_next) - _lambda(model, sigma)
            eta_h = eta * h if eta else torch.zeros_like(h)   # 0 * inf would be NaN at alpha = 0
            phi = -torch.expm1(-h - eta_h)                     # 1 - e^(-h (1 + eta))
            x = (sigma_next / sigma) * torch.exp(-eta_h) * x + alpha_next * phi * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_next * (phi / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + alpha_next * 0.5 * phi * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + _noise(x, generator) * sigma_next * (-torch.expm1(-2 * eta_h)).sqrt()
            h_last = h
        old_denoised = denoised
    return x


SAMPLERS = {f.__name__: f for f in (euler, heun, dpmpp_2m, euler_ancestral, dpmpp_2m_sde, ddim)}
