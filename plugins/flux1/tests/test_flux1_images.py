"""Image inputs through the core's generate job (``diffcore.jobs.runner.run``) on tiny saved models,
against diffusers' Kontext, Fill and Control pipelines given the same files, prompt and noise:
img2img, Kontext editing, Fill, Canny-style control, true CFG with a negative prompt."""

import numpy as np
import pytest
import torch
from einops import rearrange
from PIL import Image

from diffcore.api import ConfigError, GenerationRequest, load_image
from diffcore.testing.conformance import check_model_family
from diffcore_flux1.images import fill_condition, kontext_size, pack_mask
from diffcore_flux1.plugin import Flux1Config, build_flux1

PROMPT = "a red cat"
TOL = 1e-5


def save_png(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def random_png(path, height, width, seed):
    return save_png(path, np.random.default_rng(seed).integers(0, 256, (height, width, 3)))


def job_noise(channels, height, width, per_token, seed=7):
    """The generate job's first noise, packed as diffusers' pipelines take ``latents``."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, channels, height // per_token, width // per_token, generator=generator)
    return rearrange(noise, "b c h w -> b (h w) c")


def close_to_pipeline(ours, theirs):
    err = ((ours + 1) / 2).clamp(0, 1).sub(theirs).abs().max().item()  # pipelines return [0, 1]
    assert theirs.std() > 0.01 and err <= TOL, f"image max abs err {err:.3g}"


@torch.no_grad()
def test_kontext_editing_matches_diffusers(tiny_pipeline, tmp_path, run_job):
    """Reference tokens at t = 1 on their own grid (24 x 40 px: not the target's 32 x 32),
    outputs sliced; Kontext's defaults (guidance 2.5) from the variant name."""
    from diffusers import FluxKontextPipeline

    folder, pipe = tiny_pipeline
    ref = random_png(tmp_path / "ref.png", 24, 40, seed=1)
    model = {"path": str(folder), "variant": "kontext-dev", "resize_references": False}
    images, params = run_job(tmp_path, model, reference_image=str(ref), height=32, width=32, sampling_steps=3)
    kontext = FluxKontextPipeline(**pipe.components)
    expected = kontext(prompt=PROMPT, image=Image.open(ref), height=32, width=32, max_area=32 * 32, _auto_resize=False,
                       num_inference_steps=3, guidance_scale=2.5, max_sequence_length=16, output_type="pt",
                       latents=job_noise(64, 32, 32, per_token=4)).images
    close_to_pipeline(images, expected)
    plain, _ = run_job(tmp_path / "plain", model, height=32, width=32, sampling_steps=3)
    assert (plain - images).abs().max() > 1e-3  # the reference changed the result (beyond rounding)
    bundle = build_flux1(Flux1Config(**model, dtype="float32", max_sequence_length=16))
    assert (bundle.default_sampling_steps, bundle.guidance) == (28, 2.5)


@torch.no_grad()
def test_fill_matches_diffusers(image_variants, tiny_pipeline, tmp_path, run_job):
    """Fill-dev: [masked-image latents | 8x8-unshuffled mask] as 320 extra channels; the autoencoder
    found as ae.safetensors beside the BFL file; defaults 50 steps / guidance 30."""
    folder, fill_pipe, _ = image_variants
    image = random_png(tmp_path / "image.png", 64, 48, seed=2)
    mask = np.zeros((64, 48), dtype=np.uint8)
    mask[16:48, 8:40] = 255  # white: repaint
    mask = save_png(tmp_path / "mask.png", mask)
    model = {"path": str(folder / "flux1-fill-tiny.safetensors"), "variant": "fill-dev",
             "text_encoders": str(tiny_pipeline[0])}
    images, params = run_job(tmp_path, model, image=str(image), mask=str(mask), height=64, width=48, sampling_steps=3)
    expected = fill_pipe(prompt=PROMPT, image=Image.open(image), mask_image=Image.open(mask), height=64, width=48,
                         num_inference_steps=3, guidance_scale=30.0, max_sequence_length=16, output_type="pt",
                         latents=job_noise(64, 64, 48, per_token=16)).images
    close_to_pipeline(images, expected)
    bundle = build_flux1(Flux1Config(**model, dtype="float32", max_sequence_length=16))
    assert (bundle.default_sampling_steps, bundle.guidance, bundle.default_schedule) == (50, 30.0, {"name": "flux"})
    images = {"image": load_image(image), "mask": (load_image(mask, channels=1) + 1) / 2}
    check_model_family(bundle, GenerationRequest(batch=2, prompts=["a", "b"], negative_prompts=["", "c"], **images))
    with pytest.raises(ConfigError, match="Fill repaints the white part of a mask: set both image and mask"):
        bundle.conditions(GenerationRequest(batch=1, prompts=[PROMPT], height=64, width=48))


def test_fill_condition_matches_diffusers(image_variants):
    """The mask packing and concatenation against FluxFillPipeline.prepare_mask_latents."""
    fill_pipe = image_variants[1]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 8, 6, generator=g)  # raw: the pipeline normalises what it is given
    mask = (torch.rand(2, 1, 64, 48, generator=g) > 0.5).float()
    expected_mask, expected_latents = fill_pipe.prepare_mask_latents(mask, latents, 2, 16, 1, 64, 48, torch.float32,
                                                                     "cpu", None)
    got = fill_condition((latents - 0.1159) * 0.3611, mask)
    assert got.shape == (2, 12, 320)
    torch.testing.assert_close(got, torch.cat((expected_latents, expected_mask), dim=-1), rtol=0, atol=1e-6)
    token = pack_mask(mask)[0, 0]  # first token: its 2x2 latent pixels' 8x8 mask blocks, (c, ph, pw) order
    assert torch.equal(token.reshape(64, 2, 2)[:, 1, 0], mask[0, 0, 8:16, 0:8].reshape(64))


@torch.no_grad()
def test_control_image_matches_diffusers(image_variants, tiny_pipeline, tmp_path, run_job):
    """Canny-dev: the control map's latents as 64 extra channels (variant detected from the shapes)."""
    folder, _, control_pipe = image_variants
    control = random_png(tmp_path / "edges.png", 32, 48, seed=3)
    model = {"path": str(folder / "flux1-canny-tiny.safetensors"), "text_encoders": str(tiny_pipeline[0])}
    images, _ = run_job(tmp_path, model, image=str(control), height=32, width=48, sampling_steps=2)
    expected = control_pipe(prompt=PROMPT, control_image=Image.open(control), height=32, width=48,
                            num_inference_steps=2, guidance_scale=30.0, max_sequence_length=16, output_type="pt",
                            latents=job_noise(64, 32, 48, per_token=16)).images
    close_to_pipeline(images, expected)


@torch.no_grad()
def test_true_cfg_with_negative_prompt_matches_diffusers(tiny_pipeline, tmp_path, run_job):
    folder, pipe = tiny_pipeline
    images, params = run_job(tmp_path, {"path": str(folder)}, negative_prompt="blurry", cfg_scale=2.0,
                              height=32, width=32, sampling_steps=3)
    expected = pipe(PROMPT, negative_prompt="blurry", true_cfg_scale=2.0, height=32, width=32, num_inference_steps=3,
                    guidance_scale=3.5, max_sequence_length=16, output_type="pt",
                    latents=job_noise(64, 32, 32, per_token=4)).images
    close_to_pipeline(images, expected)
    assert params["cfg_scale"] == 2.0


@torch.no_grad()
def test_img2img_starts_from_the_encoded_image(tiny_pipeline, tmp_path, run_job):
    """init_image + strength: the bundle encodes (VAE mean, packed) and the job noises it to the
    first kept sigma; a pixel image of the right size, and encode / decode invert each other."""
    from diffcore.api import registry
    from diffcore.api import sample
    from diffcore.api import euler

    folder, pipe = tiny_pipeline
    init = random_png(tmp_path / "init.png", 32, 48, seed=4)
    images, params = run_job(tmp_path, {"path": str(folder)}, init_image=str(init), strength=0.5, height=32,
                              width=48, sampling_steps=4)
    bundle = build_flux1(Flux1Config(path=str(folder), dtype="float32", max_sequence_length=16))
    request = GenerationRequest(batch=1, prompts=[PROMPT], negative_prompts=[""], height=32, width=48)
    assert bundle.image_shape(request) == (3, 32, 48)
    x0 = bundle.encode(load_image(init)[None])
    expected_x0 = pipe.vae.encode(load_image(init)[None]).latent_dist.mean
    torch.testing.assert_close(x0, rearrange((expected_x0 - 0.1159) * 0.3611, "b c (h ph) (w pw) -> b (c ph pw) h w",
                                             ph=2, pw=2), rtol=0, atol=1e-5)
    torch.testing.assert_close(bundle.decode(x0), pipe.vae.decode(expected_x0).sample, rtol=0, atol=1e-5)
    # the job's run: 2 of 4 steps from the encoded image noised to the third sigma
    sigmas = registry("schedules").get("flux").build().sigmas(4, seq_len=8 * 12)
    noise = torch.randn(1, 64, 8, 12, generator=torch.Generator("cpu").manual_seed(7))
    latents = sample(bundle, noise, bundle.conditions(request), sigmas[2:], euler, disable=True, x0=x0)
    torch.testing.assert_close(images, bundle.decode(latents).clamp(-1, 1), rtol=0, atol=1e-5)
    assert params["strength"] == 0.5 and params["sampling_steps"] == 4


def test_kontext_sizes_and_errors(tiny_pipeline):
    assert kontext_size(1000, 1000) == (1024, 1024)
    assert kontext_size(600, 1200) == (720, 1456)  # 2:1 -> 1456 x 720 (2.02:1)
    assert kontext_size(100, 1000) == (672, 1568)  # wider than any: the widest training shape
    assert kontext_size(480, 640) == (880, 1184)
    bundle = build_flux1(Flux1Config(path=str(tiny_pipeline[0]), dtype="float32", max_sequence_length=16))
    ref = torch.zeros(3, 600, 800)
    request = GenerationRequest(batch=2, prompts=["a", "b"], reference_images=[ref])
    assert bundle.image_shape(request) == (3, 880, 1184)  # the target follows the resized reference, as in BFL
    bundle.resize_references = False
    small = GenerationRequest(batch=2, prompts=["a", "b"], reference_images=[torch.zeros(3, 30, 42)])
    assert bundle.latent_shape(small) == (64, 7, 10)  # whole tokens (4 px for the tiny 2x autoencoder)
    cond = bundle.conditions(small)
    assert cond["cond"]["ref"].shape == (2, 70, 64) and cond["uncond"]["ref_ids"].shape == (2, 70, 3)
    assert (cond["cond"]["ref_ids"][..., 0] == 1).all() and cond["cond"]["ref_ids"][0, -1].tolist() == [1, 6, 9]
    with pytest.raises(ConfigError, match="image / mask need the fill-dev variant"):
        bundle.conditions(GenerationRequest(batch=1, prompts=["a"], control_image=torch.zeros(3, 32, 32)))
    with pytest.raises(ConfigError, match=r"expected \(3, H, W\)"):
        bundle.conditions(GenerationRequest(batch=1, prompts=["a"], reference_images=[torch.zeros(32, 32)]))
