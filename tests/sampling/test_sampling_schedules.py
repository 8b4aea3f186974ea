"""Sigma schedules against diffusers' schedulers (1e-6) and their properties (hypothesis)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffcore.sampling import schedules as S

diffusers = pytest.importorskip("diffusers")
# diffusers' own numpy-2 deprecation, not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def close(ours, theirs, rtol=1e-6, atol=1e-7):
    theirs = torch.as_tensor(np.asarray(theirs), dtype=torch.float32)
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape, (ours.shape, theirs.shape)
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol)


def close_to_discrete(ours, theirs):
    """diffusers builds the DDPM table with a float32 cumulative product, 1.3e-5 off at the smallest
    sigma and 2.2e-6 above sigma 0.1 (we keep float64, as Stable Diffusion's own code did)."""
    theirs = torch.as_tensor(np.asarray(theirs), dtype=torch.float32)
    close(ours, theirs, rtol=3e-5)
    big = theirs > 0.1
    close(ours[big], theirs[big], rtol=2.5e-6)


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_flow_static_shift_matches_diffusers_flux_style_grid(steps):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))   # as FluxPipeline passes them
    close(S.flow_sigmas(steps, shift=3.0), sched.sigmas)


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flow_static_shift_on_the_sd3_grid_matches_diffusers_default(steps):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    close(S.flow_sigmas(steps, shift=3.0, train_steps=1000), sched.sigmas)


@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 8192])
@pytest.mark.parametrize("steps", [4, 28])
def test_flow_dynamic_shift_matches_diffusers(seq_len, steps):
    mu = S.dynamic_shift_mu(seq_len)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    close(S.flow_sigmas(steps, mu=mu), sched.sigmas)


def test_dynamic_mu_is_the_unclamped_line_through_the_two_anchors():
    assert S.dynamic_shift_mu(256) == pytest.approx(0.5)
    assert S.dynamic_shift_mu(4096) == pytest.approx(1.15)
    assert S.dynamic_shift_mu(8192) == pytest.approx(1.15 + 0.65 / 3840 * 4096)   # beyond max_seq_len
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    torch.testing.assert_close(S.time_shift(0.8, 1.0, t), S.static_shift(t, math.exp(0.8)))


def test_ddpm_table_matches_diffusers():
    # diffusers takes the cumulative product in float32 (relative error ~1e-5 at t = 0); we keep
    # float64 as the original Stable Diffusion code did, and agree to within that error
    sched = diffusers.EulerDiscreteScheduler(**SD)
    ac = sched.alphas_cumprod.double()
    torch.testing.assert_close(S.ddpm_sigma_table(), ((1 - ac) / ac).sqrt(), rtol=3e-5, atol=0)


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("steps", [1, 7, 30, 50])
def test_ddpm_spacings_match_euler_discrete(spacing, offset, steps):
    sched = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(steps)
    close_to_discrete(S.ddpm_sigmas(steps, spacing=spacing, steps_offset=offset), sched.sigmas)
    torch.testing.assert_close(S.ddpm_timesteps(steps, spacing=spacing, steps_offset=offset).float(),
                               sched.timesteps.float(), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("kind", ["karras", "exponential", "beta"])
@pytest.mark.parametrize("steps", [2, 10, 30])   # 1 step: diffusers range collapses to one sigma
def test_karras_exponential_beta_match_diffusers(kind, steps):
    sched = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing="linspace", **{f"use_{kind}_sigmas": True})
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod
    table = ((1 - ac) / ac) ** 0.5   # diffusers takes the range from the ends of its own table
    ours = {"karras": S.karras_sigmas, "exponential": S.exponential_sigmas, "beta": S.beta_sigmas}[kind]
    close(ours(steps, sigma_min=table[0].item(), sigma_max=table[-1].item()), sched.sigmas)


def test_beta_ppf_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for a, b in [(0.6, 0.6), (0.5, 2.0), (3.0, 1.5)]:
        for q in [1e-6, 0.01, 0.3, 0.5, 0.77, 0.999]:
            assert S.beta_ppf(q, a, b) == pytest.approx(stats.beta.ppf(q, a, b), rel=1e-9, abs=1e-12)


def test_defaults_are_the_sd_table_range():
    table = S.ddpm_sigma_table()
    assert S.SD_SIGMA_MIN == pytest.approx(table[0].item(), rel=1e-5)
    assert S.SD_SIGMA_MAX == pytest.approx(table[-1].item(), rel=1e-5)


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="positive integer"):
        S.karras_sigmas(0)
    with pytest.raises(ValueError, match="spacing"):
        S.ddpm_sigmas(10, spacing="uniform")
    with pytest.raises(ValueError, match="exceed"):
        S.ddpm_sigmas(1001)
    with pytest.raises(ValueError, match="shift"):
        S.flow_sigmas(10, shift=0.0)


# -- properties ---------------------------------------------------------------------------------

def schedules_for(steps, shift, seq_len, spacing):
    yield "flow", S.flow_sigmas(steps, shift=shift)
    yield "sd3-grid", S.flow_sigmas(steps, shift=shift, train_steps=1000)
    yield "flux", S.flow_sigmas(steps, mu=S.dynamic_shift_mu(seq_len))
    yield "ddpm", S.ddpm_sigmas(steps, spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    yield "karras", S.karras_sigmas(steps)
    yield "exponential", S.exponential_sigmas(steps)
    if steps <= 60:
        yield "beta", S.beta_sigmas(steps)


@settings(max_examples=25, deadline=None)
@given(steps=st.integers(1, 400), shift=st.floats(0.2, 10.0), seq_len=st.integers(16, 16384),
       spacing=st.sampled_from(S.SPACINGS))
def test_every_schedule_is_descending_and_ends_in_zero(steps, shift, seq_len, spacing):
    for name, sigmas in schedules_for(steps, shift, seq_len, spacing):
        assert sigmas.shape == (steps + 1,) and sigmas.dtype == torch.float32, name
        assert sigmas[-1] == 0 and (sigmas[:-1] > 0).all(), name
        assert (sigmas[1:] < sigmas[:-1]).all(), f"{name} is not strictly descending: {sigmas}"
        if name in ("flow", "flux", "sd3-grid"):
            assert sigmas[0] == 1 and sigmas.max() <= 1, name


@settings(max_examples=25, deadline=None)
@given(steps=st.integers(1, 200), a=st.floats(0.1, 20.0), b=st.floats(0.1, 20.0),
       seq_a=st.integers(16, 16384), seq_b=st.integers(16, 16384))
def test_more_shift_means_more_noise_at_every_step(steps, a, b, seq_a, seq_b):
    lo, hi = sorted([a, b])
    assert (S.flow_sigmas(steps, shift=hi) >= S.flow_sigmas(steps, shift=lo)).all()
    small, large = sorted([seq_a, seq_b])
    larger, smaller = (S.flow_sigmas(steps, mu=S.dynamic_shift_mu(n)) for n in (large, small))
    assert (larger >= smaller).all()
