"""The ``sd3`` family through diffcore's jobs: a generate run against StableDiffusion3Pipeline end
to end (text encoders, MMDiT, VAE), image-to-image and negative prompts, conformance, config errors."""

import json

import pytest
import tomli_w
import torch
from PIL import Image

import diffcore_sd3.plugin as sd3_plugin
from diffcore.api import CheckpointError, ConfigError, GenerationRequest
from diffcore.testing import plugins_for_test, run_job_file
from diffcore.testing.conformance import check_model_family
from diffcore_sd3.plugin import SD3Config, build_sd3


def run_job(folder, model, **job):
    table = {"job": {"kind": "generate", "output_dir": str(folder / "out"), "prompt": "a red cat", "num_samples": 1,
                     "batch_size": 1, "progress": False, "device": "cpu", "grid": False, "seed": 7, "height": 64,
                     "width": 64, "sampling_steps": 2, **job},
             "model": {"family": "sd3", "dtype": "float32", "max_sequence_length": 16, **model}}
    table["job"] = {k: v for k, v in table["job"].items() if v is not None}   # None: the model's default
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.toml").write_text(tomli_w.dumps(table))
    with plugins_for_test(sd3_plugin):
        images = run_job_file(folder / "job.toml")
    return images, json.loads(Image.open(folder / "out" / "sample-0000.png").text["parameters"])


@pytest.mark.usefixtures("reference_matmuls")
@torch.no_grad()
def test_generate_matches_pipeline(tiny_pipeline, tmp_path):
    """prompt + negative prompt, CFG 4.5, 2 steps, the job's seed-7 noise: diffcore's images equal
    StableDiffusion3Pipeline's from the same folder."""
    folder, pipe = tiny_pipeline
    images, params = run_job(tmp_path / "t2i", {"path": str(folder)}, negative_prompt="blurry", cfg_scale=4.5)
    assert params["sampling_steps"] == 2 and params["cfg_scale"] == 4.5
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator("cpu").manual_seed(7))
    ref = pipe("a red cat", negative_prompt="blurry", latents=noise, num_inference_steps=2, guidance_scale=4.5,
               height=64, width=64, max_sequence_length=16, output_type="pt").images
    assert images.shape == (1, 3, 64, 64)
    err = (images - (ref * 2 - 1)).abs().max().item()
    assert err <= 1e-4, f"max abs err {err:.3g}"


def test_img2img_and_defaults(tiny_pipeline, tmp_path):
    """init_image + strength starts from the encoded image; the tiny variant's defaults apply."""
    folder, _ = tiny_pipeline
    base, params = run_job(tmp_path / "base", {"path": str(folder)}, sampling_steps=None)
    assert params["sampling_steps"] == 4 and params["cfg_scale"] == 4.5   # DEFAULTS["tiny"]
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "red.png")
    edited, params = run_job(tmp_path / "i2i", {"path": str(folder)}, sampling_steps=4,
                             init_image=str(tmp_path / "red.png"), strength=0.5)
    assert params["strength"] == 0.5 and torch.isfinite(edited).all()
    assert (edited - base).abs().max() > 1e-2


def test_conformance(tiny_pipeline):
    folder, _ = tiny_pipeline
    bundle = build_sd3(SD3Config(path=str(folder), max_sequence_length=8, text_encoder_3=False))
    assert bundle.text.t5 is None and bundle.default_sampling_steps == 4
    check_model_family(bundle, GenerationRequest(batch=2, prompts=["a cat", "a dog"], height=32, width=32))


def test_config_errors(tiny_pipeline, tmp_path):
    folder, _ = tiny_pipeline
    with pytest.raises(ConfigError, match="looks like a Hugging Face hub id"):
        SD3Config(path="stabilityai/stable-diffusion-3.5-medium")
    with pytest.raises(ConfigError, match="unknown SD3 variant 'sd3.5-larg'"):
        SD3Config(variant="sd3.5-larg")
    with pytest.raises(ConfigError, match="has no text encoders"):
        build_sd3(SD3Config(path=str(folder / "transformer")))
    with pytest.raises(CheckpointError, match="no SD3 autoencoder"):
        build_sd3(SD3Config(path=str(folder / "transformer" / "diffusion_pytorch_model.safetensors"),
                            text_encoders=str(folder)))
