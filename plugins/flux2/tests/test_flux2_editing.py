"""FLUX.2 editing through the generate job and the bundle: inpainting, reference images and their
pixel caps, img2img, and each variant's sampling defaults."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore.api import CFG, ConfigError, euler, GenerationRequest, heun, sample
from diffcore.testing import plugins_for_test, run_job_file as run
from diffcore_flux2 import images as prep
from diffcore_flux2.plugin import sampling_defaults
from diffcore_flux2.sampling import get_schedule

SEQ = 16
END_TO_END = 5e-5  # pixels in [0, 1], as in test_flux2_plugin.py

JOB = """
[job]
kind = "generate"
output_dir = "{out}"
num_samples = 1
seed = {seed}
sampling_steps = 4
progress = false
grid = false
prompt = "{prompt}"
{extra}
[model]
family = "flux2"
path = "{path}"
dtype = "float32"
max_sequence_length = {seq}
"""


def _png(path, array):
    Image.fromarray(array).save(path)
    return path


def _pixels(array: np.ndarray) -> torch.Tensor:
    """An 8-bit RGB array as the generate job loads images: (3, H, W) in [-1, 1]."""
    return torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1


def _bundle(root, **overrides):
    with plugins_for_test() as pm:
        component = pm.registry("models").get("flux2")
        return component.build(component.config(path=str(root), dtype="float32", max_sequence_length=SEQ,
                                                **overrides))


def test_inpainting_job_matches_klein_inpaint_pipeline(tmp_path, flux2_folder, make_pipeline):
    """The generate job (image + mask, init_image at strength 0.75, one more reference image, cfg_scale
    left to klein-base's default 4.0) against Flux2KleinInpaintPipeline with the same seed: the
    same noise, 3 of 4 steps, the image to repaint as the first reference and the kept region
    blended back every step. The mask's edges lie on token boundaries, where diffusers' latent
    blending and our x0 replacement are the same trajectory (``sampling.keep_known``)."""
    from diffusers import Flux2KleinInpaintPipeline

    root, parts = flux2_folder(False)
    rng = np.random.default_rng(4)
    height, width, seed, prompt = 32, 48, 7, "a red cat on the mat"
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    reference = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[8:24, 16:40] = 255  # 4-pixel tokens: rows 2..5, columns 4..9 are repainted
    files = {name: _png(tmp_path / f"{name}.png", array)
             for name, array in (("image", image), ("reference", reference), ("mask", mask))}

    pipe = make_pipeline(Flux2KleinInpaintPipeline, parts, is_distilled=False)
    expected = pipe(prompt=prompt, image=Image.open(files["image"]), mask_image=Image.open(files["mask"]),
                    image_reference=Image.open(files["reference"]), strength=0.75, num_inference_steps=4,
                    guidance_scale=4.0, generator=torch.Generator().manual_seed(seed), max_sequence_length=SEQ,
                    text_encoder_out_layers=(1, 2, 3), output_type="pt").images

    extra = (f'image = "{files["image"]}"\nmask = "{files["mask"]}"\ninit_image = "{files["image"]}"\n'
             f'strength = 0.75\nreference_image = ["{files["reference"]}"]')
    job = tmp_path / "job.toml"
    job.write_text(JOB.format(out=tmp_path / "out", seed=seed, prompt=prompt, extra=extra, path=root, seq=SEQ))
    with plugins_for_test():
        got = (run(job) / 2 + 0.5).clamp(0, 1)
    err = (got - expected).abs().max().item()
    print(f"inpainting job vs Flux2KleinInpaintPipeline: max abs err {err:.3g}")
    assert got.shape == expected.shape == (1, 3, height, width)
    assert err <= END_TO_END


@pytest.mark.parametrize("sampler", [euler, heun], ids=["euler", "heun"])
def test_kept_tokens_end_as_the_encoded_image(flux2_folder, sampler):
    """Whatever the sampler and CFG, tokens with mask 0 end exactly at the image's latents, tokens
    with mask 1 are the model's, and edge tokens with a fractional mask lie in between."""
    root, _ = flux2_folder(False)
    bundle = _bundle(root)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 24, 32, generator=g) * 2 - 1
    mask = torch.zeros(1, 24, 32)
    mask[:, 5:14, 9:23] = 1  # edges inside tokens: fractional token values
    request = GenerationRequest(batch=2, prompts=["a cat", "a dog"], image=image, mask=mask)
    conditions = bundle.conditions(request)
    known, token_mask = conditions["cond"]["known"], conditions["cond"]["known_mask"]
    assert token_mask.shape == (2, 1, 6, 8) and ((token_mask > 0) & (token_mask < 1)).any()
    noise = torch.randn(2, *bundle.latent_shape(request), generator=g)
    with torch.no_grad():
        out = sample(bundle, noise, conditions, torch.tensor(get_schedule(3, 48)), sampler, guidance=[CFG(scale=4.0)],
                     disable=True)
    kept = (token_mask == 0).expand_as(out)
    torch.testing.assert_close(out[kept], known[kept], rtol=0, atol=1e-5)
    assert (out - known)[(token_mask == 1).expand_as(out)].abs().mean() > 0.1


def test_reference_preparation_follows_bfl():
    """Cap (Lanczos) then centre crop to multiples, as BFL's default_prep does with PIL."""
    array = np.random.default_rng(0).integers(0, 256, (90, 150, 3), dtype=np.uint8)
    cap = 80 * 80
    got = prep.prepare_reference(_pixels(array), cap, 16)
    # BFL: cap_pixels -> center_crop_to_multiple_of_x -> ToTensor * 2 - 1
    scale = (cap / (150 * 90)) ** 0.5
    w, h = int(150 * scale), int(90 * scale)
    pil = Image.fromarray(array).resize((w, h), Image.LANCZOS)
    left, top = (w - w // 16 * 16) // 2, (h - h // 16 * 16) // 2
    pil = pil.crop((left, top, left + w // 16 * 16, top + h // 16 * 16))
    expected = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255 * 2 - 1
    assert got.shape == expected.shape == (3, 48, 96)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    untouched = _pixels(array[:80, :96])
    assert torch.equal(prep.prepare_reference(untouched, 10**6, 16), untouched)  # no resize, nothing to crop


def test_reference_caps_one_and_several():
    assert prep.reference_cap(1) == 2024**2 and prep.reference_cap(2) == prep.reference_cap(5) == 1024**2
    assert prep.reference_size(1500, 1000, prep.reference_cap(1), 16) == (1488, 992)         # under 2024^2: crop only
    assert prep.reference_size(1500, 1000, prep.reference_cap(2), 16) == (1248, 832)         # 1254 x 836 -> crop
    assert prep.reference_size(3000, 2000, prep.reference_cap(1), 16) == (2464, 1648)        # 2478 x 1652 -> crop
    with pytest.raises(ConfigError, match="at least 64 pixels a side"):
        prep.prepare_reference(torch.zeros(3, 40, 200), 10**6, 16)
    with pytest.raises(ConfigError, match="aspect ratio of at most 8:1"):
        prep.prepare_reference(torch.zeros(3, 64, 600), 10**6, 16)


def test_bundle_caps_references_by_their_count(flux2_folder, monkeypatch):
    """The bundle asks for BFL's cap by the number of references the model sees (the image to
    repaint counts), or for ``reference_max_pixels`` when set; the output takes the first
    reference's prepared size when the request names none."""
    import diffcore_flux2.bundle as B

    root, _ = flux2_folder(False)
    caps = []
    real = B.prepare_reference

    def spy(image, cap, multiple, index=0):
        caps.append(cap)
        return real(image, cap, multiple, index)

    monkeypatch.setattr(B, "prepare_reference", spy)
    bundle = _bundle(root)
    ref = torch.zeros(3, 66, 70)
    bundle.reference_latents([ref])
    bundle.reference_latents([ref, ref])
    bundle.reference_latents([ref], others=1)
    assert caps == [2024**2, 1024**2, 1024**2, 1024**2]
    assert bundle.image_size(GenerationRequest(batch=1, reference_images=[ref, ref])) == (64, 68)
    assert bundle.image_size(GenerationRequest(batch=1, height=32, reference_images=[ref])) == (32, 68)
    assert bundle.image_size(GenerationRequest(batch=1)) == (1024, 1024)
    caps.clear()
    _bundle(root, reference_max_pixels=4096).reference_latents([ref])
    assert caps == [4096]


def test_references_at_their_own_size_match_klein_pipeline(flux2_folder, make_pipeline):
    """Two references whose sides are not multiples of the token size and no output size: both
    stacks centre-crop them and take the output size from the first one."""
    from diffusers import Flux2KleinPipeline

    root, parts = flux2_folder(False)
    bundle = _bundle(root)
    rng = np.random.default_rng(2)
    arrays = [rng.integers(0, 256, (66, 70, 3), dtype=np.uint8), rng.integers(0, 256, (64, 90, 3), dtype=np.uint8)]
    noise = torch.randn(1, 16, 16, 17, generator=torch.Generator().manual_seed(1))
    expected = make_pipeline(Flux2KleinPipeline, parts, is_distilled=False)(
        image=[Image.fromarray(a) for a in arrays], prompt="a blue dog", latents=noise, num_inference_steps=2,
        guidance_scale=4.0, max_sequence_length=SEQ, text_encoder_out_layers=(1, 2, 3), output_type="pt").images
    request = GenerationRequest(batch=1, prompts=["a blue dog"],
                                reference_images=[_pixels(a) for a in arrays])
    assert bundle.latent_shape(request) == (16, 16, 17)
    with torch.no_grad():
        latents = sample(bundle, noise, bundle.conditions(request), torch.tensor(get_schedule(2, 16 * 17)), euler,
                         guidance=[CFG(scale=bundle.default_cfg_scale)], disable=True)
        got = (bundle.decode(latents) / 2 + 0.5).clamp(0, 1)
    err = (got - expected).abs().max().item()
    print(f"2 uncropped references vs Flux2KleinPipeline: max abs err {err:.3g}")
    assert got.shape == expected.shape == (1, 3, 64, 68)
    assert err <= END_TO_END


def test_klein_kv_editing_matches_klein_kv_pipeline(flux2_folder, make_pipeline):
    """klein-9b-kv's editing: the reference runs through the model on the first step only (its
    keys and values cached), against ``Flux2KleinKVPipeline``; the variant is read from the
    folder's ``model_index.json``."""
    import json

    from diffusers import Flux2KleinKVPipeline

    root, parts = flux2_folder(False)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinKVPipeline"}))
    bundle = _bundle(root)
    assert bundle.reference_cache and bundle.default_cfg_scale == 1.0 and bundle.default_sampling_steps == 4
    array = np.random.default_rng(3).integers(0, 256, (64, 72, 3), dtype=np.uint8)
    noise = torch.randn(1, 16, 16, 18, generator=torch.Generator().manual_seed(4))
    expected = make_pipeline(Flux2KleinKVPipeline, parts)(
        image=Image.fromarray(array), prompt="a red cat", latents=noise, num_inference_steps=3,
        max_sequence_length=SEQ, text_encoder_out_layers=(1, 2, 3), output_type="pt").images
    request = GenerationRequest(batch=1, prompts=["a red cat"], reference_images=[_pixels(array)])
    conditions = bundle.conditions(request)
    calls = []
    network_forward = bundle.network.forward

    def counting(x, *args, **kwargs):
        cache = kwargs["ref_cache"]
        calls.append((x.shape[1], cache.filled))
        return network_forward(x, *args, **kwargs)

    bundle.network.forward = counting
    with torch.no_grad():
        latents = sample(bundle, noise, conditions, torch.tensor(get_schedule(3, 16 * 18)), euler,
                         guidance=[CFG(scale=bundle.default_cfg_scale)], disable=True)
        got = (bundle.decode(latents) / 2 + 0.5).clamp(0, 1)
    assert calls == [(16 * 18, False), (16 * 18, True), (16 * 18, True)]  # filled once, then read
    err = (got - expected).abs().max().item()
    print(f"klein-kv editing vs Flux2KleinKVPipeline: max abs err {err:.3g}")
    assert got.shape == expected.shape == (1, 3, 64, 72)
    assert err <= END_TO_END


def test_img2img_shapes_and_encoding(flux2_folder):
    root, _ = flux2_folder(False)
    bundle = _bundle(root)
    request = GenerationRequest(batch=1, height=24, width=40)
    channels, height, width = bundle.image_shape(request)
    assert (channels, height, width) == (3, 24, 40)
    assert bundle.latent_shape(request) == (16, 24 // bundle.downscale, 40 // bundle.downscale)
    images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = bundle.encode(images)
    assert latents.dtype == torch.float32 and latents.shape == (2, *bundle.latent_shape(request))
    torch.testing.assert_close(latents, bundle.vae.encode(images))
    with pytest.raises(ConfigError, match="multiples of 4"):
        bundle.image_shape(GenerationRequest(batch=1, height=30, width=40))


def test_img2img_job_starts_from_the_encoded_image(tmp_path, flux2_folder):
    """At strength 0.25 of 4 steps one Euler step runs from sigma_3: the job's output equals that
    step taken by hand from the encoded init image and the job's noise (default CFG 4.0)."""
    root, _ = flux2_folder(False)
    array = np.random.default_rng(5).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    init = _png(tmp_path / "init.png", array)
    job = tmp_path / "job.toml"
    job.write_text(JOB.format(out=tmp_path / "out", seed=3, prompt="a cat", path=root, seq=SEQ,
                              extra=f'init_image = "{init}"\nstrength = 0.25\nheight = 24\nwidth = 32'))
    with plugins_for_test():
        got = run(job)
    bundle = _bundle(root)
    request = GenerationRequest(batch=1, prompts=["a cat"], negative_prompts=[""], height=24, width=32)
    noise = torch.randn((1, *bundle.latent_shape(request)), generator=torch.Generator().manual_seed(3))
    sigmas = torch.tensor(get_schedule(4, 6 * 8))[3:]
    with torch.no_grad():
        x0 = bundle.encode(_pixels(array)[None])
        latents = sample(bundle, noise, bundle.conditions(request), sigmas, euler, guidance=[CFG(scale=4.0)],
                         disable=True, x0=x0)
        expected = bundle.decode(latents).clamp(-1, 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant, steps, guidance, cfg", [
    ("dev", 50, 4.0, 1.0), ("klein-4b", 4, 1.0, 1.0), ("klein-9b", 4, 1.0, 1.0),
    ("klein-base-4b", 50, 4.0, 4.0), ("klein-base-9b", 50, 4.0, 4.0), ("klein-9b-kv", 4, 1.0, 1.0)])
def test_sampling_defaults_per_variant(variant, steps, guidance, cfg):
    assert sampling_defaults(variant) == (steps, guidance, cfg)


def test_guidance_overrides_and_distilled_klein_refuses_it():
    assert sampling_defaults("dev", 2.5) == (50, 2.5, 1.0)
    assert sampling_defaults("klein-base-4b", 3.0) == (50, 3.0, 3.0)
    assert sampling_defaults("klein-4b", 1.0) == (4, 1.0, 1.0)
    with pytest.raises(ConfigError, match="klein-4b is guidance-distilled"):
        sampling_defaults("klein-4b", 3.5)


def test_inpainting_needs_image_and_mask(flux2_folder):
    root, _ = flux2_folder(False)
    bundle = _bundle(root)
    with pytest.raises(ConfigError, match="needs both image"):
        bundle.conditions(GenerationRequest(batch=1, prompts=["a cat"], mask=torch.ones(1, 16, 16)))
