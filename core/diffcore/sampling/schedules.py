"""Sigma schedules (timers): functions returning a descending 1-D float32 tensor ending in 0.0.

``steps`` sampling steps take ``steps + 1`` sigmas. Flow-matching schedules live in [0, 1]
(``alpha = 1 - sigma``); the others in the variance-exploding range of a discrete DDPM model
(``alpha = 1``). Intermediate values are computed in float64 and rounded once at the end, so the
tests can hold them to diffusers' numbers at 1e-6.
"""

from __future__ import annotations

import math

import torch

SPACINGS = ("leading", "trailing", "linspace")

# sqrt((1 - abar) / abar) of the scaled-linear DDPM table (SD 1.x / SDXL) at t = 0 and t = 999
SD_SIGMA_MIN = 0.0291672
SD_SIGMA_MAX = 14.6146


def _check_steps(steps: int) -> None:
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def _finish(sigmas: torch.Tensor, append_zero: bool = True) -> torch.Tensor:
    sigmas = sigmas.to(torch.float64)
    if append_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(torch.float32)


# -- flow matching ------------------------------------------------------------------------------

def static_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift ``shift * t / (1 + (shift - 1) * t)`` (Esser et al. 2024, eq. 23)."""
    return shift * t / (1 + (shift - 1) * t)


def time_shift(mu: float, sigma_power: float, t: torch.Tensor) -> torch.Tensor:
    """FLUX's resolution-dependent shift ``e^mu / (e^mu + (1/t - 1)^sigma_power)`` (BFL ``time_shift``).

    Equal to ``static_shift(t, e^mu)`` when ``sigma_power == 1``; ``t = 0`` maps to 0.
    """
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma_power)


def dynamic_shift_mu(seq_len: int, *, base_shift: float = 0.5, max_shift: float = 1.15,
                     base_seq_len: int = 256, max_seq_len: int = 4096) -> float:
    """``mu`` on the line through ``(base_seq_len, base_shift)`` and ``(max_seq_len, max_shift)``.

    Not clamped: larger images than ``max_seq_len`` shift further, as in BFL's ``get_schedule``.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (seq_len - base_seq_len)


def flow_sigmas(steps: int, *, shift: float = 1.0, mu: float | None = None, train_steps: int = 0) -> torch.Tensor:
    """Flow-matching sigmas: a uniform grid in ``t`` pushed through a timestep shift.

    ``mu`` given: FLUX's ``time_shift(mu, 1, t)`` (BFL ``get_schedule``); otherwise SD3's static
    ``shift``. ``train_steps == 0`` uses BFL's grid ``t = linspace(1, 0, steps + 1)``.
    ``train_steps = N`` reproduces SD3's reference sampler (and diffusers'
    FlowMatchEulerDiscreteScheduler by default): ``t = linspace(1, t_min, steps)`` where ``t_min``
    is the smallest of the N discrete training sigmas (itself shifted when the shift is static),
    then 0 appended.
    """
    _check_steps(steps)
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if train_steps:
        t_min = 1.0 / train_steps if mu is not None else float(static_shift(torch.tensor(1.0 / train_steps,
                                                                                         dtype=torch.float64), shift))
        t = torch.linspace(1.0, t_min, steps, dtype=torch.float64)
    else:
        t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    sigmas = time_shift(mu, 1.0, t) if mu is not None else static_shift(t, shift)
    return _finish(sigmas, append_zero=bool(train_steps))


# -- discrete DDPM ------------------------------------------------------------------------------

def ddpm_sigma_table(*, beta_start: float = 0.00085, beta_end: float = 0.012, train_steps: int = 1000) -> torch.Tensor:
    """Float64 sigmas ``sqrt((1 - abar_t) / abar_t)`` of the scaled-linear DDPM schedule, index = t.

    ``betas = linspace(sqrt(beta_start), sqrt(beta_end), train_steps)^2`` (Stable Diffusion's
    "scaled_linear"); a discrete-time family hands this to the denoiser as ``sigma_table``.
    """
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, train_steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def ddpm_timesteps(steps: int, *, spacing: str = "leading", steps_offset: int = 0,
                   train_steps: int = 1000) -> torch.Tensor:
    """Descending (possibly fractional) training timesteps, the three spacings of Lin et al. 2023,
    table 2 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), as diffusers builds them."""
    _check_steps(steps)
    i = torch.arange(steps, dtype=torch.float64)
    if spacing == "leading":
        t = (i * (train_steps // steps)).round().flip(0) + steps_offset
    elif spacing == "trailing":
        t = (train_steps - i * (train_steps / steps)).round() - 1
    elif spacing == "linspace":
        t = torch.linspace(0, train_steps - 1, steps, dtype=torch.float64).flip(0)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {', '.join(SPACINGS)}")
    return t


def ddpm_sigmas(steps: int, *, spacing: str = "leading", steps_offset: int = 0, beta_start: float = 0.00085,
                beta_end: float = 0.012, train_steps: int = 1000) -> torch.Tensor:
    """Sigmas of a discrete DDPM model at spaced timesteps (diffusers' EulerDiscreteScheduler).

    Fractional timesteps ("linspace") read the table linearly in sigma, as diffusers'
    default ``interpolation_type="linear"`` does; timesteps past the table clamp to its ends.
    """
    if steps > train_steps:
        raise ValueError(f"steps ({steps}) cannot exceed the model's {train_steps} training timesteps")
    table = ddpm_sigma_table(beta_start=beta_start, beta_end=beta_end, train_steps=train_steps)
    t = ddpm_timesteps(steps, spacing=spacing, steps_offset=steps_offset, train_steps=train_steps)
    t = t.clamp(0, train_steps - 1)
    low = t.floor().long().clamp(max=train_steps - 2)
    w = t - low
    return _finish(table[low] * (1 - w) + table[low + 1] * w)


# -- schedules between sigma_min and sigma_max --------------------------------------------------

def karras_sigmas(steps: int, *, sigma_min: float = SD_SIGMA_MIN, sigma_max: float = SD_SIGMA_MAX,
                  rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 ("Elucidating the Design Space", eq. 5): uniform in ``sigma^(1/rho)``."""
    _check_steps(steps)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(steps: int, *, sigma_min: float = SD_SIGMA_MIN, sigma_max: float = SD_SIGMA_MAX) -> torch.Tensor:
    """Uniform in ``log sigma`` (k-diffusion's ``get_sigmas_exponential``)."""
    _check_steps(steps)
    return _finish(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp())


def beta_sigmas(steps: int, *, sigma_min: float = SD_SIGMA_MIN, sigma_max: float = SD_SIGMA_MAX,
                alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Lee et al. 2024 ("Beta Sampling is All You Need"): ``sigma_min + (sigma_max - sigma_min) *
    BetaInv(1 - u)`` for ``u = linspace(0, 1, steps)``, denser at both ends for alpha, beta < 1."""
    _check_steps(steps)
    u = torch.linspace(0, 1, steps, dtype=torch.float64)
    ppf = torch.tensor([beta_ppf(1 - float(q), alpha, beta) for q in u], dtype=torch.float64)
    return _finish(sigma_min + ppf * (sigma_max - sigma_min))


def beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of the regularised incomplete beta function ``I_x(a, b)``, by bisection."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(64):  # 2^-64 < float64 resolution on [0, 1]
        mid = 0.5 * (lo + hi)
        if _betainc(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _betainc(x: float, a: float, b: float) -> float:
    """``I_x(a, b)`` by its continued fraction (Lentz's method), using the symmetry
    ``I_x(a, b) = 1 - I_{1-x}(b, a)`` where the fraction converges slowly."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(1.0 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for n in range(400):
        m = n // 2
        if n == 0:
            num = 1.0
        elif n % 2:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-16:
            break
    return math.exp(log_front) * (f - 1.0) / a
