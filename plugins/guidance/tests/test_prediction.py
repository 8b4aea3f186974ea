"""APG and CFG-Zero*: the published formulas, their limits, and the conformance checks on DiT."""

import pytest
import torch
from guidance_helpers import ForwardCounter, run

from diffcore.api import StepInfo, registry
from diffcore.testing.conformance import check_guidance_processor
from diffcore_guidance.prediction import APG, CFGZeroStar


def cfg(scale):
    comp = registry("guidance").get("cfg")
    return comp.factory(comp.config(scale=scale))


def flow_step(x, step=0, num_steps=10, sigma=0.7):
    s = torch.full((x.shape[0],), sigma)
    k = s.reshape(-1, *[1] * (x.ndim - 1))
    return StepInfo(x=x, sigma=s, step=step, num_steps=num_steps, prediction_type="flow",
                    to_denoised=lambda raw: x - k * raw, from_denoised=lambda x0: (x - x0) / k)


def preds(seed=0, shape=(2, 1, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("processor", [APG(), APG(space="raw", momentum=0.0), APG(scale=6.0, eta=0.5, start=0.2),
                                       CFGZeroStar(), CFGZeroStar(scale=2.0, zero_init_steps=3)],
                         ids=["apg", "apg-raw", "apg-window", "cfg-zero-star", "cfg-zero-star-3"])
def test_conformance_on_dit(processor, dit, req):
    check_guidance_processor(processor, dit, req)


@pytest.mark.parametrize("space", ["raw", "denoised"])
def test_apg_without_projection_rescaling_or_momentum_is_cfg(space, dit, req):
    apg = APG(scale=3.0, eta=1.0, norm_threshold=0.0, momentum=0.0, space=space)
    torch.testing.assert_close(run(dit, [apg], req), run(dit, [cfg(3.0)], req), rtol=1e-5, atol=1e-5)


def test_apg_with_eta_zero_moves_orthogonally_to_the_conditional_prediction():
    x, cond, uncond = preds()
    out = APG(scale=5.0, eta=0.0, norm_threshold=0.0, momentum=0.0, space="raw").combine(
        cond, {"cond": cond, "uncond": uncond}, flow_step(x))
    update = (out - cond).flatten(1)
    cosine = (update * cond.flatten(1)).sum(1) / (update.norm(dim=1) * cond.flatten(1).norm(dim=1))
    assert cosine.abs().max() < 1e-5
    assert update.norm(dim=1).min() > 0.1


def test_apg_caps_the_update_norm_at_the_threshold():
    x, cond, uncond = preds()
    r, scale = 0.5, 4.0
    out = APG(scale=scale, eta=1.0, norm_threshold=r, momentum=0.0, space="raw").combine(
        cond, {"cond": cond, "uncond": uncond}, flow_step(x))
    norms = (out - cond).flatten(1).norm(dim=1) / (scale - 1)
    assert (cond - uncond).flatten(1).norm(dim=1).min() > r                      # the cap binds
    torch.testing.assert_close(norms, torch.full_like(norms, r))


def test_apg_momentum_adds_beta_times_the_running_average_once_per_step():
    x, c1, u1 = preds(0)
    _, c2, u2 = preds(1)
    apg = APG(scale=2.0, eta=1.0, norm_threshold=0.0, momentum=-0.5, space="raw")
    first = apg.combine(c1, {"cond": c1, "uncond": u1}, flow_step(x, step=0))
    torch.testing.assert_close(first, c1 + (c1 - u1))
    second = apg.combine(c2, {"cond": c2, "uncond": u2}, flow_step(x, step=1))
    again = apg.combine(c2, {"cond": c2, "uncond": u2}, flow_step(x, step=1))   # a Heun corrector: same step
    torch.testing.assert_close(second, c2 + ((c2 - u2) - 0.5 * (c1 - u1)))
    assert torch.equal(second, again)
    restart = apg.combine(c2, {"cond": c2, "uncond": u2}, flow_step(x, step=0))  # a new run starts clean
    torch.testing.assert_close(restart, c2 + (c2 - u2))


def test_cfg_zero_star_optimised_scale():
    """With ``x_u = k x_c`` the optimal scale is ``1/k``: ``s* x_u = x_c`` and the result is ``x_c``."""
    x, cond, _ = preds()
    out = CFGZeroStar(scale=7.0, zero_init_steps=0).combine(cond, {"cond": cond, "uncond": 2 * cond},
                                                            flow_step(x, step=3))
    torch.testing.assert_close(out, cond)
    x, cond, uncond = preds(2)
    c, u = cond.flatten(1), uncond.flatten(1)
    s = ((c * u).sum(1) / (u * u).sum(1)).reshape(-1, 1, 1, 1)
    out = CFGZeroStar(scale=3.0).combine(cond, {"cond": cond, "uncond": uncond}, flow_step(x, step=2))
    torch.testing.assert_close(out, s * uncond + 3.0 * (cond - s * uncond))


def test_cfg_zero_star_zero_init_leaves_the_sample_and_skips_the_uncond_branch(dit, req):
    proc = CFGZeroStar(scale=3.0, zero_init_steps=2)
    seen = []
    with ForwardCounter(dit.network) as counter:
        from diffcore.api import sample

        conditions = dit.conditions(req)
        noise = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            sample(dit, noise, conditions, torch.linspace(1, 0, 5), registry("samplers").get("euler").build(),
                   guidance=[proc], callback=seen.append, disable=True)
    assert counter.batches == [2, 2, 4, 4]                  # no uncond while zero-initialised
    assert torch.equal(seen[1]["x"], noise)                # zero velocity: the sample stands still
    assert torch.equal(seen[0]["denoised"], noise)
    assert not torch.equal(seen[2]["x"], seen[3]["x"])


def test_scale_one_runs_no_extra_branch(dit, req):
    for proc in (APG(scale=1.0), CFGZeroStar(scale=1.0, zero_init_steps=0)):
        with ForwardCounter(dit.network) as counter:
            out = run(dit, [proc], req)
        assert counter.batches == [2] * 4
        assert torch.equal(out, run(dit, [], req))
