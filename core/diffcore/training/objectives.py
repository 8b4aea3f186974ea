"""Training objectives, chosen by the bundle's ``prediction_type``, and timestep sampling.

All three share the core's sigma convention (docs/architecture.md): ``x = alpha * x0 + sigma * noise``.

- ``"flow"``, rectified flow / flow matching (Lipman et al. 2023, arXiv:2210.02747; Liu et al.
  2022, arXiv:2209.03003): ``x_sigma = (1 - sigma) x0 + sigma noise`` with sigma in [0, 1], and
  the network regresses the velocity ``noise - x0``. The other convention, ``x_t = (1 - t) noise + t data``
  with target ``data - noise`` is the same path with ``sigma = 1 - t`` (and the time axis, hence
  the velocity's sign, reversed); we keep sigma as "how much noise" everywhere.
- ``"epsilon"`` (Ho et al. 2020, arXiv:2006.11239) and ``"v"`` (Salimans & Ho 2022,
  arXiv:2202.00512) on the DDPM discrete schedule (the bundle's ``sigma_table``). In the core's
  variance-exploding form ``x = x0 + sigma noise`` with ``sigma_t = sqrt((1 - abar_t) / abar_t)``;
  the network sees it scaled by ``c_in = 1 / sqrt(sigma^2 + 1)``, which is exactly DDPM's
  ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``. Targets: ``noise`` and
  ``sqrt(abar_t) noise - sqrt(1 - abar_t) x0`` (= ``(noise - sigma x0) / sqrt(sigma^2 + 1)``).

Timesteps are drawn as ``u`` in (0, 1) (the flow sigma; for DDPM the index ``floor(u T)``):
``uniform``; ``logit-normal`` ``u = sigmoid(n)``, ``n ~ N(mean, std)`` (Esser et al. 2024, SD3,
arXiv:2403.03206 section 3.1); ``shifted`` ``u' = s u / (1 + (s - 1) u)`` on a uniform ``u``
(SD3's resolution-dependent shift; ``s > 1`` spends more steps at high noise); ``flux-shift``
a logit-normal ``u`` moved by FLUX's resolution-dependent shift, ``mu`` on the line through
(256 tokens, 0.5) and (4096, 1.15) (kohya's sd-scripts ``flux_shift``; the sampler's shift).
Every draw takes an explicit ``torch.Generator`` so a run is reproducible bit for bit.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import torch
import torch.nn.functional as F

TimestepSampling = Literal["uniform", "logit-normal", "shifted", "flux-shift"]


@attrs.frozen
class TimestepSampler:
    """Draws ``u`` in (0, 1), one per sample."""

    method: TimestepSampling = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0

    def __call__(self, n: int, generator: torch.Generator, device: torch.device | str = "cpu",
                 seq_len: int | None = None) -> torch.Tensor:
        """``seq_len``: the image tokens per sample, which ``flux-shift`` needs."""
        if self.method in ("logit-normal", "flux-shift"):
            normal = torch.randn(n, generator=generator) * self.logit_std + self.logit_mean
            u = torch.sigmoid(normal)
            if self.method == "flux-shift":
                from diffcore.sampling.schedules import dynamic_shift_mu, time_shift

                if seq_len is None:
                    raise ValueError("flux-shift timestep sampling depends on the image size: this family "
                                     "does not say how many tokens its latents make (ModelBundle.training_tokens)")
                u = time_shift(dynamic_shift_mu(seq_len), 1.0, u)
        else:
            u = torch.rand(n, generator=generator)
            if self.method == "shifted":
                u = self.shift * u / (1 + (self.shift - 1) * u)
            elif self.method != "uniform":
                raise ValueError(f"unknown timestep sampling {self.method!r}; "
                                 "expected uniform, logit-normal, shifted or flux-shift")
        return u.to(device)


def noisy_inputs(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, u: torch.Tensor,
                 sigma_table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(network input, network time, regression target) for clean ``x0`` at levels ``u``.

    The input and time are what the sampling engine's denoiser hands ``bundle.forward`` at the
    same sigma (``diffcore.sampling.denoisers``): flow gets ``x`` and sigma; epsilon / v get
    ``x / sqrt(sigma^2 + 1)`` and, when the bundle has a ``sigma_table``, the timestep ``t`` of
    sigma ``sigma_table[t]`` (else sigma, drawn from the default Stable Diffusion table).
    """
    shape = (-1,) + (1,) * (x0.ndim - 1)
    if prediction_type == "flow":
        sigma = u.to(x0.dtype)
        s = sigma.view(shape)
        return (1 - s) * x0 + s * noise, sigma, noise - x0
    if prediction_type not in ("epsilon", "v"):
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected flow, epsilon or v")
    from diffcore.sampling.schedules import ddpm_sigma_table

    table = (ddpm_sigma_table() if sigma_table is None else sigma_table).double().cpu()
    t = (u.double().cpu() * len(table)).long().clamp(0, len(table) - 1)
    sigma = table[t]
    a = (sigma ** 2 + 1).rsqrt()                    # sqrt(abar_t) = c_in
    b = sigma * a                                   # sqrt(1 - abar_t)
    a, b = (c.to(device=x0.device, dtype=x0.dtype).view(shape) for c in (a, b))
    target = noise if prediction_type == "epsilon" else a * noise - b * x0
    time = sigma if sigma_table is None else t.double()
    return a * x0 + b * noise, time.to(device=x0.device, dtype=x0.dtype), target


def diffusion_loss(bundle: Any, x0: torch.Tensor, cond: dict[str, Any], generator: torch.Generator,
                   timesteps: TimestepSampler = TimestepSampler()) -> torch.Tensor:
    """Mean squared error of ``bundle.forward`` against its prediction type's target.

    Noise and timesteps are drawn on the CPU from ``generator`` (the same numbers on every device).
    """
    noise = torch.randn(x0.shape, generator=generator).to(device=x0.device, dtype=x0.dtype)
    u = timesteps(x0.shape[0], generator, device=x0.device, seq_len=bundle.training_tokens(x0))
    x, time, target = noisy_inputs(bundle.prediction_type, x0, noise, u, getattr(bundle, "sigma_table", None))
    pred = bundle.forward(x, time, **cond)
    return F.mse_loss(pred.float(), target.float())
