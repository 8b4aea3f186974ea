"""Integrators on Gaussian data, where the ideal denoiser and the exact ODE solution are known.

- convergence order of every deterministic sampler against the exact solution, for flow,
  epsilon and v models (orders in the assert messages and the terminal summary);
- output distributions of every sampler, deterministic and stochastic, approach N(MU, S^2);
- with alpha = 1 each sampler is k-diffusion's (reference loops below, written from its formulas);
- a flow model sampled in x equals a VE model sampled in x / alpha (the half-log-SNR form);
- seeds, callbacks, cancellation.
"""

import math

import numpy as np
import pytest
import torch

from diffcore.sampling import samplers
from diffcore.sampling.schedules import flow_sigmas, karras_sigmas
from sampling_gaussian import MU, S, TABLE, exact_ode, ideal_denoiser, marginal

PARAMS = ["flow", "epsilon", "v"]
STEPS = [8, 16, 32, 64]
ODE = {  # name -> (sampler, expected order)
    "euler": (samplers.euler, 1),
    "ddim": (samplers.ddim, 1),
    "heun": (samplers.heun, 2),
    "dpmpp_2m": (samplers.dpmpp_2m, 2),
    "dpmpp_2m_sde(eta=0)": (lambda *a, **k: samplers.dpmpp_2m_sde(*a, eta=0.0, **k), 2),
}


def ode_grid(prediction_type, steps):
    """A grid with finite half-log-SNR at both ends, so every step shrinks as steps grow: Karras
    over the DDPM table's range (VE), linspace over [0.99, 0.01] (flow)."""
    if prediction_type == "flow":
        return 0.01 + 0.98 * flow_sigmas(steps).double()
    return karras_sigmas(steps + 1, sigma_min=TABLE[0].item(), sigma_max=TABLE[-1].item())[:-1].double()


def ode_errors(sampler, prediction_type, grid, steps=STEPS):
    errors = []
    for n in steps:
        sigmas = grid(prediction_type, n)
        x, _ = marginal(16, sigmas[0], prediction_type, torch.Generator().manual_seed(1))
        out = sampler(ideal_denoiser(prediction_type), x, sigmas, disable=True)
        assert torch.isfinite(out).all()
        errors.append((out - exact_ode(x, sigmas[0], sigmas[-1], prediction_type)).abs().max().item())
    return errors


def order(errors, steps=STEPS):
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


@pytest.mark.parametrize("prediction_type", PARAMS)
@pytest.mark.parametrize("name", list(ODE))
def test_convergence_order_on_the_ode(name, prediction_type, record_order):
    sampler, expected = ODE[name]
    errors = ode_errors(sampler, prediction_type, ode_grid)
    measured = order(errors)
    record_order(f"{name} / {prediction_type}", measured)
    assert abs(measured - expected) < 0.25, \
        f"{name} on {prediction_type}: measured order {measured:.2f}, expected {expected} (errors {errors})"


@pytest.mark.parametrize("name", list(ODE))
def test_flow_schedule_from_pure_noise_to_zero(name, record_order):
    """The real flow schedule: sigma 1 (alpha = 0, lambda = -inf) to 0 (lambda = +inf), shift 3.

    Runs without NaN and converges. Multistep solvers in lambda lose a little here: near both
    ends the steps stay O(1) in lambda however many there are, so their error is
    O(log n / n^2) and over 8..64 steps the measured order is about 1.5; Heun, stepping in sigma,
    keeps order 2 (its last, Euler step to 0 makes it reach that only past 32 steps).
    """
    sampler, expected = ODE[name]
    errors = ode_errors(sampler, "flow", lambda _, n: flow_sigmas(n, shift=3.0).double())
    measured = order(errors)
    record_order(f"{name} / flow, sigma 1 -> 0", measured)
    floor = {1: 0.9, 2: 1.4}[expected]
    assert measured > floor and all(a > b for a, b in zip(errors, errors[1:])), \
        f"{name} from sigma 1 to 0: measured order {measured:.2f} (errors {errors})"


# -- distributions ------------------------------------------------------------------------------

STOCHASTIC = {
    "euler_ancestral": lambda *a, **k: samplers.euler_ancestral(*a, eta=1.0, **k),
    "dpmpp_2m_sde": lambda *a, **k: samplers.dpmpp_2m_sde(*a, eta=1.0, **k),
    "dpmpp_2m_sde(heun)": lambda *a, **k: samplers.dpmpp_2m_sde(*a, eta=1.0, solver_type="heun", **k),
    "ddim(eta=1)": lambda *a, **k: samplers.ddim(*a, eta=1.0, **k),
}
N = 10_000


def full_schedule(prediction_type, steps):
    if prediction_type == "flow":
        return flow_sigmas(steps).double()
    return karras_sigmas(steps, sigma_min=TABLE[0].item(), sigma_max=TABLE[-1].item()).double()


def run(sampler, prediction_type, steps, seed=2):
    sigmas = full_schedule(prediction_type, steps)
    x, z = marginal(N, sigmas[0], prediction_type, torch.Generator().manual_seed(1))
    out = sampler(ideal_denoiser(prediction_type), x, sigmas, disable=True,
                  generator=torch.Generator().manual_seed(seed))
    assert torch.isfinite(out).all(), f"non-finite output after {steps} steps"
    return out, z


def check_moments(out, std_tol):
    mean_err = (out.mean(0) - MU).abs()
    std_err = (out.std(0) / S - 1).abs()
    assert (mean_err < 4 * S / math.sqrt(N) + 0.01).all(), f"mean {out.mean(0)} vs {MU}"
    assert (std_err < std_tol).all(), f"std {out.std(0)} vs {S}: relative errors {std_err}"


@pytest.mark.parametrize("prediction_type", PARAMS)
@pytest.mark.parametrize("name", list(ODE))
def test_deterministic_samplers_approach_the_data_distribution(name, prediction_type):
    sampler, expected = ODE[name]
    errors = []
    for steps in (8, 32, 128):
        out, z = run(sampler, prediction_type, steps)
        # Every sampler's last step to sigma = 0 returns the denoised estimate. Following the exact
        # ODE to the last nonzero sigma and denoising there gives std  a S^2 / sqrt(a^2 S^2 + s^2)
        # times the starting z's: what is left is the samplers' discretisation error. (For VE the
        # last sigma is the same at every step count, a floor of ~1% in std at S = 0.2.)
        s = full_schedule(prediction_type, steps)[-2]
        a = 1 - s if prediction_type == "flow" else 1.0
        target = a * S ** 2 / (a ** 2 * S ** 2 + s ** 2).sqrt() * z.std(0)
        errors.append(((out.std(0) - target).abs() / S).max().item())
    assert errors[0] > errors[1] > errors[2], f"std errors do not shrink with steps 8, 32, 128: {errors}"
    check_moments(out, std_tol={1: 0.05, 2: 0.03}[expected])


@pytest.mark.parametrize("prediction_type", PARAMS)
@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_stochastic_samplers_approach_the_data_distribution(name, prediction_type):
    errors = []
    for steps in (8, 128):
        out, _ = run(STOCHASTIC[name], prediction_type, steps)
        errors.append((out.std(0) / S - 1).abs().max().item())
    assert errors[1] < errors[0], f"std errors do not shrink from 8 to 128 steps: {errors}"
    check_moments(out, std_tol=0.08)


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_stochastic_samplers_are_seeded_by_the_generator(name):
    sigmas = full_schedule("flow", 6)
    x = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    outs = [STOCHASTIC[name](ideal_denoiser("flow"), x, sigmas, disable=True,
                             generator=torch.Generator().manual_seed(seed)) for seed in (5, 5, 6)]
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])


def test_eta_zero_is_the_deterministic_sampler():
    for pt in PARAMS:
        sigmas = full_schedule(pt, 10)
        x, _ = marginal(8, sigmas[0], pt, torch.Generator().manual_seed(3))
        euler = samplers.euler(ideal_denoiser(pt), x, sigmas, disable=True)
        for fn in (samplers.ddim, samplers.euler_ancestral):
            torch.testing.assert_close(fn(ideal_denoiser(pt), x, sigmas, eta=0.0, disable=True), euler,
                                       rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(samplers.dpmpp_2m_sde(ideal_denoiser(pt), x, sigmas, eta=0.0, disable=True),
                                   samplers.dpmpp_2m(ideal_denoiser(pt), x, sigmas, disable=True),
                                   rtol=1e-10, atol=1e-10)


# -- k-diffusion's formulas (alpha = 1) ---------------------------------------------------------
# Reference loops written from k-diffusion's sampling.py formulas, variance-exploding only.

def kd_euler(model, x, sigmas, g):
    for i in range(len(sigmas) - 1):
        d = (x - model(x, sigmas[i] * x.new_ones(len(x)))) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def kd_heun(model, x, sigmas, g):
    ones = x.new_ones(len(x))
    for i in range(len(sigmas) - 1):
        d = (x - model(x, sigmas[i] * ones)) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - model(x2, sigmas[i + 1] * ones)) / sigmas[i + 1]
            x = x + (d + d2) / 2 * dt
    return x


def kd_dpmpp_2m(model, x, sigmas, g):
    old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones(len(x)))
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised
        else:
            r = (t - (-sigmas[i - 1].log())) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * d
        old = denoised
    return x


def kd_euler_ancestral(model, x, sigmas, g, eta=1.0):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones(len(x)))
        s, s_next = sigmas[i], sigmas[i + 1]
        sigma_up = torch.minimum(s_next, eta * (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5)
        sigma_down = (s_next ** 2 - sigma_up ** 2) ** 0.5
        x = x + (x - denoised) / s * (sigma_down - s)
        if s_next > 0:
            x = x + torch.randn(x.shape, generator=g, dtype=x.dtype) * sigma_up
    return x


def kd_dpmpp_2m_sde(model, x, sigmas, g, eta=1.0, solver_type="midpoint"):
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones(len(x)))
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - old)
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old)
            if eta:
                x = x + torch.randn(x.shape, generator=g, dtype=x.dtype) * sigmas[i + 1] * \
                    (-2 * eta_h).expm1().neg().sqrt()
            h_last = h
        old = denoised
    return x


K_DIFFUSION = [
    ("euler", samplers.euler, kd_euler),
    ("heun", samplers.heun, kd_heun),
    ("dpmpp_2m", samplers.dpmpp_2m, kd_dpmpp_2m),
    ("euler_ancestral", samplers.euler_ancestral, kd_euler_ancestral),
    ("euler_ancestral(eta=0.5)", lambda *a, **k: samplers.euler_ancestral(*a, eta=0.5, **k),
     lambda *a: kd_euler_ancestral(*a, eta=0.5)),
    ("dpmpp_2m_sde", samplers.dpmpp_2m_sde, kd_dpmpp_2m_sde),
    ("dpmpp_2m_sde(heun, eta=0.7)", lambda *a, **k: samplers.dpmpp_2m_sde(*a, eta=0.7, solver_type="heun", **k),
     lambda *a: kd_dpmpp_2m_sde(*a, eta=0.7, solver_type="heun")),
    ("ddim(eta=1) = euler_ancestral", lambda *a, **k: samplers.ddim(*a, eta=1.0, **k), kd_euler_ancestral),
]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
@pytest.mark.parametrize("name,ours,reference", K_DIFFUSION, ids=[k[0] for k in K_DIFFUSION])
def test_alpha_one_is_k_diffusion(name, ours, reference, prediction_type):
    sigmas = full_schedule(prediction_type, 12)
    x, _ = marginal(8, sigmas[0], prediction_type, torch.Generator().manual_seed(4))
    got = ours(ideal_denoiser(prediction_type), x, sigmas, disable=True, generator=torch.Generator().manual_seed(9))
    want = reference(ideal_denoiser(prediction_type), x, sigmas, torch.Generator().manual_seed(9))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


class VEView:
    """A flow denoiser seen in variance-exploding coordinates ``y = x / alpha``, ``s = sigma / alpha``."""

    def __init__(self, flow):
        self.flow = flow

    def __call__(self, y, s):
        sigma = s / (1 + s)
        return self.flow(y * (1 - sigma)[:, None], sigma)

    def alpha(self, s):
        return torch.ones_like(s)


INVARIANT = [("euler", samplers.euler), ("ddim", samplers.ddim), ("dpmpp_2m", samplers.dpmpp_2m),
             ("euler_ancestral", samplers.euler_ancestral),
             ("ddim(eta=0.6)", lambda *a, **k: samplers.ddim(*a, eta=0.6, **k)),
             ("dpmpp_2m_sde", samplers.dpmpp_2m_sde),
             ("dpmpp_2m_sde(heun)", lambda *a, **k: samplers.dpmpp_2m_sde(*a, solver_type="heun", **k))]


@pytest.mark.parametrize("name,sampler", INVARIANT, ids=[k[0] for k in INVARIANT])
def test_flow_is_the_ve_sampler_in_scaled_coordinates(name, sampler):
    """The half-log-SNR form makes a sampler blind to the scaling of x: sampling a flow model in
    x equals sampling its VE view in x / alpha (with the same noise). Heun steps in sigma and is
    the one sampler not invariant."""
    sigmas = 0.999 * flow_sigmas(10, shift=2.0).double()
    x, _ = marginal(8, sigmas[0], "flow", torch.Generator().manual_seed(5))
    flow = ideal_denoiser("flow")
    got = sampler(flow, x, sigmas, disable=True, generator=torch.Generator().manual_seed(7))
    y = sampler(VEView(flow), x / (1 - sigmas[0]), sigmas / (1 - sigmas), disable=True,
                generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, y, rtol=1e-9, atol=1e-9)


# -- callbacks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(samplers.SAMPLERS))
def test_callback_sees_every_step_and_can_cancel(name):
    sampler = samplers.SAMPLERS[name]
    sigmas = full_schedule("flow", 5)
    x = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seen = []
    sampler(ideal_denoiser("flow"), x, sigmas, callback=seen.append, disable=True)
    assert [info["i"] for info in seen] == list(range(5))
    for info in seen:
        assert set(info) == {"x", "i", "sigma", "sigma_next", "denoised"}
        assert info["sigma"] == sigmas[info["i"]] and info["sigma_next"] == sigmas[info["i"] + 1]
        assert info["denoised"].shape == x.shape

    class Cancel(Exception):
        pass

    def stop_at_2(info):
        if info["i"] == 2:
            raise Cancel

    model = ideal_denoiser("flow")
    with pytest.raises(Cancel):
        sampler(model, x, sigmas, callback=stop_at_2, disable=True)
    assert model.forward.calls <= 3 * (2 if name == "heun" else 1)
