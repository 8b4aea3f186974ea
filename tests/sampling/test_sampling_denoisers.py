"""Denoisers: raw <-> x0 in both directions, input scaling, discrete timesteps, add_noise."""

import pytest
import torch

from diffcore.models import ModelBundle
from diffcore.sampling.denoisers import (DENOISERS, EpsilonDenoiser, FlowDenoiser, VDenoiser, add_noise, alpha,
                                         make_denoiser, sigma_to_t, t_to_sigma)
from diffcore.sampling.schedules import ddpm_sigma_table

TABLE = ddpm_sigma_table()


def noisy(prediction_type, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    return x0, noise, add_noise(x0, noise, sigma, prediction_type)


@pytest.mark.parametrize("prediction_type", ["flow", "epsilon", "v"])
def test_the_true_raw_target_denoises_to_x0(prediction_type):
    sigma = torch.tensor([0.9, 0.5, 0.05], dtype=torch.float64)
    x0, noise, x = noisy(prediction_type, sigma)
    s = sigma[:, None, None, None]
    raw = {"flow": noise - x0,                                   # velocity of the straight path
           "epsilon": noise,
           "v": (noise - s * x0) / (s ** 2 + 1).sqrt()}[prediction_type]   # sqrt(abar) eps - sqrt(1-abar) x0
    den = DENOISERS[prediction_type](lambda *a: raw)
    torch.testing.assert_close(den.to_denoised(x, sigma, raw), x0)
    torch.testing.assert_close(den.from_denoised(x, sigma, x0), raw)
    torch.testing.assert_close(den(x, sigma), x0)


@pytest.mark.parametrize("prediction_type", ["flow", "epsilon", "v"])
def test_to_and_from_denoised_are_inverses(prediction_type):
    sigma = torch.tensor([0.99, 0.3, 0.01], dtype=torch.float64)
    _, _, x = noisy(prediction_type, sigma)
    raw = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    den = DENOISERS[prediction_type](lambda *a: raw)
    torch.testing.assert_close(den.from_denoised(x, sigma, den.to_denoised(x, sigma, raw)), raw)


def test_network_inputs_per_parametrisation():
    seen = {}

    def forward(x_in, time, **cond):
        seen.update(x_in=x_in, time=time, cond=cond)
        return torch.zeros_like(x_in)

    x, sigma = torch.ones(2, 3), torch.tensor([1.0, 14.6146])
    FlowDenoiser(forward)(x, torch.tensor([1.0, 0.5]), y=3)
    assert torch.equal(seen["x_in"], x) and torch.equal(seen["time"], torch.tensor([1.0, 0.5]))
    assert seen["cond"] == {"y": 3}
    EpsilonDenoiser(forward)(x, sigma)
    torch.testing.assert_close(seen["x_in"], x / (sigma[:, None] ** 2 + 1).sqrt())
    assert torch.equal(seen["time"], sigma)                       # continuous-time model: sigma itself
    VDenoiser(forward, sigma_table=TABLE)(x, sigma)
    torch.testing.assert_close(seen["time"], torch.tensor([t_of(1.0), 999.0]), rtol=0, atol=1e-3)


def t_of(sigma):
    return sigma_to_t(torch.tensor([sigma], dtype=torch.float64), TABLE.log()).item()


def test_sigma_to_t_interpolates_log_sigma_in_the_table():
    log = TABLE.log()
    k = torch.tensor([0, 1, 17, 500, 998, 999])
    torch.testing.assert_close(sigma_to_t(TABLE[k], log), k.double())
    mid = ((log[10] + log[11]) / 2).exp()                           # halfway in log sigma
    assert t_of(mid.item()) == pytest.approx(10.5, abs=1e-9)
    t = torch.linspace(0, 999, 77, dtype=torch.float64)
    torch.testing.assert_close(sigma_to_t(t_to_sigma(t, log), log), t)
    assert t_of(1e-4) == 0.0 and t_of(100.0) == 999.0               # clamped to the table's ends
    assert sigma_to_t(torch.tensor(1.0), log).shape == ()


def test_alpha_and_add_noise():
    sigma = torch.tensor([0.0, 0.25, 1.0])
    assert torch.equal(alpha(sigma, "flow"), torch.tensor([1.0, 0.75, 0.0]))
    assert torch.equal(alpha(sigma, "v"), torch.ones(3))
    x0, noise = torch.full((3, 2), 2.0), torch.full((3, 2), -1.0)
    torch.testing.assert_close(add_noise(x0, noise, sigma, "flow")[:, 0], torch.tensor([2.0, 1.25, -1.0]))
    torch.testing.assert_close(add_noise(x0, noise, 0.5, "epsilon"), torch.full((3, 2), 1.5))
    with pytest.raises(ValueError, match="prediction_type"):
        alpha(sigma, "x0")


def test_make_denoiser_reads_the_bundle():
    net = torch.nn.Identity()
    bundle = ModelBundle(net, prediction_type="epsilon", sigma_table=TABLE)
    den = make_denoiser(bundle)
    assert isinstance(den, EpsilonDenoiser) and den.log_sigmas is not None
    assert isinstance(make_denoiser(ModelBundle(net)), FlowDenoiser)
    with pytest.raises(ValueError, match="unknown prediction_type 'sample'"):
        make_denoiser(ModelBundle(net, prediction_type="sample"))
