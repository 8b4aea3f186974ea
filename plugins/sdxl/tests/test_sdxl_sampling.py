"""Whole tiny SDXL runs against diffusers' pipelines, given the same prompts and starting latents."""

import pytest
import torch

from diffcore.api import CFG, build_schedule, euler, sample
from diffcore_sdxl.bundle import SDXLBundle
from diffcore_sdxl.load import load_unet
from diffcore_sdxl.text import SDXLText

PROMPTS = ["a red cat", "two dogs on a beach"]
TOL = 1e-5


def bundle_from(folder, **kwargs) -> SDXLBundle:
    return SDXLBundle(network=load_unet(folder), text=SDXLText.from_folder(folder), latent_scale=2, **kwargs)


def start_latents(pipe, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(diffusers' ``latents`` argument, the x it starts from): it multiplies given latents by
    ``init_noise_sigma = sqrt(sigma0^2 + 1)`` for leading spacing (the core's ``sample`` starts at
    ``sigma0 * noise``), so our sampler is started from the very same x."""
    latents = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return latents, latents * pipe.scheduler.init_noise_sigma


@pytest.mark.usefixtures("reference_matmuls")
@pytest.mark.parametrize("negative", [None, ["blurry", "dark"]])
@torch.no_grad()
def test_text_to_image_matches_pipeline(tiny_pipelines, negative):
    folder, pipe = tiny_pipelines["base"]
    bundle = bundle_from(folder)
    sigmas = build_schedule(bundle).sigmas(4)   # the bundle's default: leading spacing, steps offset 1
    pipe.scheduler.set_timesteps(4)
    # diffusers builds its table in float32 (ours: float64), 1e-6 apart; run both on its sigmas
    assert torch.allclose(sigmas, pipe.scheduler.sigmas, rtol=3e-6)
    sigmas = pipe.scheduler.sigmas.clone()
    latents, x = start_latents(pipe, 2)
    expected = pipe(prompt=PROMPTS, negative_prompt=negative, num_inference_steps=4, guidance_scale=5.0,
                    height=16, width=16, latents=latents, output_type="latent").images
    request = {"prompts": PROMPTS, "negative_prompts": negative, "height": 16, "width": 16}
    # x0 = x with zero noise: the sampler starts from exactly diffusers' x (alpha = 1 for epsilon)
    got = sample(bundle, torch.zeros_like(x), bundle.conditions(request), sigmas, euler, guidance=[CFG(scale=5.0)],
                 disable=True, x0=x)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max() <= TOL, f"max abs err {(got - expected).abs().max():.3g}"


@pytest.mark.usefixtures("reference_matmuls")
@torch.no_grad()
def test_img2img_refiner_matches_pipeline(tiny_pipelines):
    """The refiner on given latents with strength 0.5 (4 steps: both skip the first two)."""
    folder, pipe = tiny_pipelines["refiner"]
    bundle = bundle_from(folder)
    init = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    pipe.scheduler.set_timesteps(4)
    sigmas = pipe.scheduler.sigmas[2:].clone()   # its float32 table (see above)
    # diffusers draws its noise inside prepare_latents (randn_tensor): the same seeded generator gives ours
    g = torch.Generator().manual_seed(6)
    expected = pipe(prompt=PROMPTS, image=init, strength=0.5, num_inference_steps=4, guidance_scale=5.0,
                    output_type="latent", generator=g).images
    request = {"prompts": PROMPTS, "height": 16, "width": 16}
    got = sample(bundle, noise, bundle.conditions(request), sigmas, euler, guidance=[CFG(scale=5.0)],
                 disable=True, x0=init)
    assert (got - expected).abs().max() <= TOL, f"max abs err {(got - expected).abs().max():.3g}"


@pytest.mark.usefixtures("reference_matmuls")
@torch.no_grad()
def test_v_prediction_matches_pipeline(tiny_pipelines):
    """A v-prediction finetune (prediction_type = "v"): the same UNet read as predicting v, against
    the pipeline with a ``v_prediction`` scheduler, trailing spacing."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    folder, base = tiny_pipelines["base"]
    scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config, prediction_type="v_prediction",
                                                   timestep_spacing="trailing")
    pipe = StableDiffusionXLPipeline(**{**base.components, "scheduler": scheduler})
    bundle = bundle_from(folder, prediction_type="v")
    pipe.scheduler.set_timesteps(4)
    sigmas = pipe.scheduler.sigmas.clone()
    latents, x = start_latents(pipe, 2)
    expected = pipe(prompt=PROMPTS, num_inference_steps=4, guidance_scale=5.0, height=16, width=16, latents=latents,
                    output_type="latent").images
    request = {"prompts": PROMPTS, "height": 16, "width": 16}
    got = sample(bundle, torch.zeros_like(x), bundle.conditions(request), sigmas, euler, guidance=[CFG(scale=5.0)],
                 disable=True, x0=x)
    assert expected.abs().max() > 0.1
    # v's x0 (x / (s^2 + 1) - v s / sqrt(s^2 + 1)) rounds differently from diffusers' order of
    # operations; the latents reach 1.6 here, and differ by up to 1e-5 (AVX-512 kernels) to 2.5e-5
    # (AVX2): 2e-5 of the latents' range
    torch.testing.assert_close(got, expected, rtol=TOL, atol=2 * TOL * expected.abs().max().item())
