"""SD3 sampling against diffusers' StableDiffusion3Pipeline: the shifted schedule, a 4-step run
with CFG, and skip-layer guidance against the pipeline's ``skip_guidance_layers``."""

import pytest
import torch

from diffcore.api import CFG, FlowConfig, StepInfo, euler, flow_schedule, sample
from diffcore_sd3.bundle import SD3Bundle
from diffcore_sd3.guidance import SD3Conditions, SkipLayerGuidance, skip_key
from diffcore_sd3.load import load_transformer

TOL = 1e-5


def sd3_sigmas(steps, shift=3.0):
    """The family's ``sd3`` preset: the flow schedule on the 1000-step training grid."""
    return flow_schedule(FlowConfig(shift=shift, train_steps=1000)).sigmas(steps)


@pytest.mark.parametrize("steps, shift", [(4, 3.0), (28, 3.0), (50, 1.0)])
def test_schedule_matches_diffusers(steps, shift):
    """The core's ``sd3`` preset (shift on the 1000-step grid) is FlowMatchEulerDiscreteScheduler's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    ours = sd3_sigmas(steps, shift)
    assert ours.shape == scheduler.sigmas.shape and (ours - scheduler.sigmas).abs().max() <= 2e-7


@pytest.fixture(scope="module")
def run(tiny_pipeline):
    """``run(cfg, slg=None)`` -> (ours, diffusers') latents of a 4-step 8 x 8-latent run from the
    same noise and embeddings (cached: the tests share runs)."""
    folder, pipe = tiny_pipeline
    bundle = SD3Bundle(network=load_transformer(folder))
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 16, 8, 8, generator=g)
    context, y = torch.randn(2, 9, 48, generator=g), torch.randn(2, 40, generator=g)
    uncond_context, uncond_y = torch.randn(2, 9, 48, generator=g), torch.randn(2, 40, generator=g)

    cache = {}

    @torch.no_grad()
    def go(cfg: float, slg: dict | None = None):
        key = (cfg, tuple(sorted(slg.items())) if slg else None)
        if key not in cache:
            cache[key] = compute(cfg, slg)
        return cache[key]

    def compute(cfg, slg):
        chain = ([CFG(scale=cfg)] if cfg != 1 else []) + ([SkipLayerGuidance(**slg)] if slg else [])
        conditions = SD3Conditions(cond={"context": context, "y": y}, uncond={"context": uncond_context, "y": uncond_y})
        ours = sample(bundle, noise, conditions, sd3_sigmas(4), euler, chain,
                      disable=True)
        kw = dict(skip_guidance_layers=list(slg["layers"]), skip_layer_guidance_scale=slg["scale"],
                  skip_layer_guidance_start=slg["start"], skip_layer_guidance_stop=slg["stop"]) if slg else {}
        ref = pipe(prompt_embeds=context, pooled_prompt_embeds=y, negative_prompt_embeds=uncond_context,
                   negative_pooled_prompt_embeds=uncond_y, latents=noise.clone(), num_inference_steps=4,
                   guidance_scale=cfg, output_type="latent", height=64, width=64, **kw).images
        return ours, ref

    return go


@pytest.mark.usefixtures("reference_matmuls")
@pytest.mark.parametrize("cfg", [1.0, 4.5], ids=["no-cfg", "cfg"])
def test_four_steps_match_pipeline(run, cfg):
    ours, ref = run(cfg)
    assert ref.abs().max() > 0.5
    err = (ours - ref).abs().max().item()
    assert err <= TOL, f"max abs err {err:.3g}"


@pytest.mark.usefixtures("reference_matmuls")
def test_skip_layer_guidance_matches_pipeline(run):
    """Block 1 skipped on steps 1 and 2 of 4 (diffusers' open window 0.04 < i < 2.4), with CFG."""
    slg = dict(layers=(1,), scale=2.8, start=0.01, stop=0.6)
    ours, ref = run(4.5, slg)
    err = (ours - ref).abs().max().item()
    assert err <= TOL, f"max abs err {err:.3g}"
    plain, _ = run(4.5)
    assert (ours - plain).abs().max() > 1e-3  # SLG changed the result


def test_slg_window_and_derived_conditions():
    """Active over [start, stop): at 28 steps the steps diffusers' open window (0.28 < i < 5.6)
    picks; ``cond|skip=...`` is ``cond`` plus ``skip_layers``, and only real keys are listed."""
    slg = SkipLayerGuidance()
    on = [i for i in range(28) if slg.active(StepInfo(x=None, sigma=None, step=i, num_steps=28,
                                                      prediction_type="flow", to_denoised=None, from_denoised=None))]
    assert on == [1, 2, 3, 4, 5]
    conditions = SD3Conditions(cond={"context": 1, "y": 2})
    assert skip_key("cond", (7, 8, 9)) in conditions and "uncond|skip=7" not in conditions
    assert conditions["cond|skip=7,8,9"] == {"context": 1, "y": 2, "skip_layers": (7, 8, 9)}
    assert list(conditions) == ["cond"]
