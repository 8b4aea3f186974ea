"""Inpainting against diffusers' ``StableDiffusionXLInpaintPipeline``: latent blending with a
4-channel UNet (from pure noise and with strength < 1) and the 9-channel inpainting UNet, on
tiny random models at fp32, given the same prompts, image latents and noise."""

import pytest
import torch

from diffcore.api import CFG, euler, sample
from diffcore_sdxl.bundle import SDXLBundle
from diffcore_sdxl.load import load_unet
from diffcore_sdxl.text import SDXLText
from diffcore_sdxl.vae import load_vae

PROMPTS = ["a red cat", "two dogs on a beach"]
TOL = 1e-5


def mask_image() -> torch.Tensor:
    """(1, 16, 16): repaint a block on the right, keep the rest; soft values on its edge (binarised)."""
    m = torch.zeros(1, 16, 16)
    m[:, 2:12, 6:15] = 1.0
    m[:, 2:12, 5] = 0.7
    m[:, 12, 6:15] = 0.3
    return m


def image() -> torch.Tensor:
    return torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(11)) * 2 - 1


def inpaint_pipe(tiny_pipelines, spacing: str, unet=None):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline

    _, base = tiny_pipelines["base"]
    scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config, timestep_spacing=spacing)
    return StableDiffusionXLInpaintPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2, unet=unet or base.unet, scheduler=scheduler)


def bundle_for(folder, unet_folder=None) -> SDXLBundle:
    return SDXLBundle(network=load_unet(unet_folder or folder), text=SDXLText.from_folder(folder),
                      vae=load_vae(folder), latent_scale=2)


def run_ours(bundle, request, sigmas, noise, x0=None):
    conditions = bundle.conditions(request)
    times = torch.stack([bundle_time(bundle, s) for s in sigmas[:-1]])
    conditions = bundle.schedule_conditions(conditions, times)
    return sample(bundle, noise, conditions, sigmas, euler, guidance=[CFG(scale=5.0)], disable=True, x0=x0)


def bundle_time(bundle, sigma):
    from diffcore.api import make_denoiser

    return make_denoiser(bundle).time(sigma.reshape(1))[0]


@pytest.mark.usefixtures("reference_matmuls")
@torch.no_grad()
def test_blending_from_noise_matches_pipeline(tiny_pipelines):
    """Strength 1 (the kept region starts as noise): trailing spacing, where diffusers starts
    from ``sigma_0 * noise`` as the core does, so both runs start from the same latents."""
    folder, _ = tiny_pipelines["base"]
    pipe = inpaint_pipe(tiny_pipelines, "trailing")
    bundle = bundle_for(folder)
    img, mask = image(), mask_image()
    known = bundle.encode(img[None])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe.scheduler.set_timesteps(4)
    sigmas = pipe.scheduler.sigmas.clone()
    assert float(pipe.scheduler.init_noise_sigma) == float(sigmas[0])
    expected = pipe(prompt=PROMPTS, image=known.expand(2, -1, -1, -1), mask_image=mask[None], strength=1.0,
                    num_inference_steps=4, guidance_scale=5.0, height=16, width=16, latents=noise,
                    output_type="latent").images
    request = {"batch": 2, "prompts": PROMPTS, "height": 16, "width": 16, "image": img, "mask": mask}
    got = run_ours(bundle, request, sigmas, noise)
    keep = torch.nn.functional.interpolate((mask >= 0.5).float()[None], size=(8, 8)) == 0
    assert (got - known).abs()[keep.expand_as(got)].max() < 1e-5   # the kept region is the image
    # After the first step the kept region is image + sigma_1 * noise to 3e-6 (float32 rounding of
    # a step from |x| ~ 40 at sigma_0 = 14.6, where diffusers writes the sum directly); the random
    # UNet turns that into 2.5e-5 (AVX-512 kernels) to 5.2e-5 (AVX2) in the repainted region by the
    # end, against latents up to ~47: float32 rounding, relative 1e-6
    err = (got - expected).abs()
    assert err.max() <= 2e-6 * expected.abs().max(), f"max abs err {err.max():.3g}"


@pytest.mark.usefixtures("reference_matmuls")
@torch.no_grad()
def test_blending_with_strength_matches_pipeline(tiny_pipelines):
    """Strength 0.5 on the default (leading) schedule: both skip the first 2 of 4 steps and start
    from the image noised by the same noise."""
    folder, _ = tiny_pipelines["base"]
    pipe = inpaint_pipe(tiny_pipelines, "leading")
    bundle = bundle_for(folder)
    img, mask = image(), mask_image()
    known = bundle.encode(img[None]).expand(2, -1, -1, -1)
    pipe.scheduler.set_timesteps(4)
    sigmas = pipe.scheduler.sigmas[2:].clone()
    expected = pipe(prompt=PROMPTS, image=known, mask_image=mask[None], strength=0.5, num_inference_steps=4,
                    guidance_scale=5.0, height=16, width=16, generator=torch.Generator().manual_seed(6),
                    output_type="latent").images
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    request = {"batch": 2, "prompts": PROMPTS, "height": 16, "width": 16, "image": img, "mask": mask,
               "init_image": img, "strength": 0.5}
    got = run_ours(bundle, request, sigmas, noise, x0=known)
    err = (got - expected).abs()
    assert err.max() <= TOL, f"max abs err {err.max():.3g}"


@pytest.mark.usefixtures("reference_matmuls")
@torch.no_grad()
def test_nine_channel_unet_matches_pipeline(tiny_pipelines, diffusers_unet, tmp_path):
    """The inpainting UNet sees [latents, mask, masked-image latents]; no blending."""
    folder, _ = tiny_pipelines["base"]
    unet = diffusers_unet(seed=4, in_channels=9)
    unet.save_pretrained(tmp_path / "unet")
    pipe = inpaint_pipe(tiny_pipelines, "leading", unet=unet)
    bundle = bundle_for(folder, tmp_path / "unet")
    assert bundle.network.params.in_channels == 9
    img, mask = image(), mask_image()
    masked = bundle.encode((img * (mask >= 0.5).logical_not())[None])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe.scheduler.set_timesteps(4)
    sigmas = pipe.scheduler.sigmas.clone()
    expected = pipe(prompt=PROMPTS, image=img[None], mask_image=mask[None], masked_image_latents=masked,
                    strength=1.0, num_inference_steps=4, guidance_scale=5.0, height=16, width=16, latents=noise,
                    output_type="latent").images
    request = {"batch": 2, "prompts": PROMPTS, "height": 16, "width": 16, "image": img, "mask": mask}
    # diffusers starts from init_noise_sigma * noise (leading spacing): start ours from the same x
    got = run_ours(bundle, request, sigmas, torch.zeros_like(noise), x0=noise * pipe.scheduler.init_noise_sigma)
    err = (got - expected).abs()
    assert err.max() <= TOL, f"max abs err {err.max():.3g}"


def test_inpainting_refusals(tiny_pipelines):
    from diffcore.api import ConfigError

    folder, _ = tiny_pipelines["base"]
    bundle = bundle_for(folder)
    base = {"batch": 1, "prompts": ["a cat"], "height": 16, "width": 16}
    with pytest.raises(ConfigError, match="both image"):
        bundle.conditions({**base, "image": image()})
    with pytest.raises(ConfigError, match="init_image"):
        bundle.conditions({**base, "image": image(), "mask": mask_image(), "strength": 0.5})
    with pytest.raises(ConfigError, match=r"\(1, height, width\)"):
        bundle.conditions({**base, "image": image(), "mask": torch.zeros(3, 16, 16)})
    # no size given: the image's
    assert bundle.size({"image": torch.zeros(3, 24, 40), "mask": torch.zeros(1, 24, 40)}) == (24, 40)
