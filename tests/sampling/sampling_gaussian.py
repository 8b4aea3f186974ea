"""Gaussian data, where everything has a closed form.

Data ``x0 ~ N(MU, diag(S^2))`` noised as ``x = alpha x0 + sigma eps`` is Gaussian too, so the
Bayes-optimal denoiser ``E[x0 | x]`` and the probability-flow ODE's solution are exact formulas:

    E[x0 | x] = MU + alpha S^2 / (alpha^2 S^2 + sigma^2) * (x - alpha MU)
    x(sigma') = alpha' MU + sqrt(alpha'^2 S^2 + sigma'^2) / sqrt(alpha^2 S^2 + sigma^2) * (x - alpha MU)

The ideal networks below predict what a perfectly trained velocity / epsilon / v model would.
"""

from __future__ import annotations

import torch

from diffcore.sampling.denoisers import DENOISERS, alpha, t_to_sigma
from diffcore.sampling.schedules import ddpm_sigma_table, flow_sigmas, karras_sigmas

MU = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=torch.float64)
S = torch.tensor([0.5, 1.0, 0.2, 1.5], dtype=torch.float64)
TABLE = ddpm_sigma_table()


def ideal_x0(x, sigma, a):
    return MU + a * S ** 2 / (a ** 2 * S ** 2 + sigma ** 2) * (x - a * MU)


def exact_ode(x, sigma, sigma_end, prediction_type):
    """Where the probability-flow ODE takes ``x`` from ``sigma`` to ``sigma_end``."""
    a, a_end = alpha(sigma, prediction_type), alpha(sigma_end, prediction_type)
    scale = (a_end ** 2 * S ** 2 + sigma_end ** 2).sqrt() / (a ** 2 * S ** 2 + sigma ** 2).sqrt()
    return a_end * MU + scale * (x - a * MU)


def marginal(n, sigma, prediction_type, generator):
    """n exact samples of x at noise level sigma (the sampler's ideal starting point)."""
    z = torch.randn(n, len(MU), generator=generator, dtype=torch.float64)
    a = alpha(torch.as_tensor(sigma, dtype=torch.float64), prediction_type)
    return a * MU + (a ** 2 * S ** 2 + sigma ** 2).sqrt() * z, z


class IdealNetwork:
    """``forward(x_in, time) -> raw``: the exact velocity / epsilon / v for the Gaussian data."""

    def __init__(self, prediction_type, sigma_table=None):
        self.prediction_type = prediction_type
        self.log_sigmas = None if sigma_table is None else sigma_table.log()
        self.calls = 0

    def __call__(self, x_in, time):
        self.calls += 1
        sigma = time if self.log_sigmas is None else t_to_sigma(time, self.log_sigmas)
        sigma = sigma.to(torch.float64)[:, None]
        if self.prediction_type == "flow":
            d = ideal_x0(x_in, sigma, 1 - sigma)
            return (x_in - (1 - sigma) * d) / sigma - d          # E[noise] - E[x0]
        x = x_in * (sigma ** 2 + 1).sqrt()                         # undo c_in
        d = ideal_x0(x, sigma, 1.0)
        eps = (x - d) / sigma
        return eps if self.prediction_type == "epsilon" else (eps - sigma * d) / (sigma ** 2 + 1).sqrt()


def ideal_denoiser(prediction_type, *, table=True):
    """The library's denoiser around the ideal network (discrete timesteps for epsilon / v)."""
    sigma_table = TABLE if table and prediction_type != "flow" else None
    return DENOISERS[prediction_type](IdealNetwork(prediction_type, sigma_table), sigma_table)


def schedule(prediction_type, steps):
    """Flow: shifted linspace from 1 to 0. Epsilon / v: Karras over the DDPM table's range, ending
    at its smallest sigma (a last jump to 0 is the same size for every step count)."""
    if prediction_type == "flow":
        return flow_sigmas(steps, shift=3.0).double()
    return karras_sigmas(steps + 1, sigma_min=TABLE[0].item(), sigma_max=TABLE[-1].item())[:-1].double()
