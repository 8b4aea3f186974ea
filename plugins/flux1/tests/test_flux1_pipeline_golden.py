"""Fixed-seed outputs of the generate job on tiny random FLUX.1 models (text-to-image, true CFG,
img2img, Kontext, Fill, Canny), held bit for bit to the files in tests/golden/pipeline/ (recorded
before the generation pipeline was shared by the jobs)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore.testing.goldens import check_golden

GOLDEN = Path(__file__).resolve().parents[3] / "tests" / "golden" / "pipeline"


def random_png(path, height, width, seed, channels=3):
    shape = (height, width, channels) if channels > 1 else (height, width)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)).save(path)
    return str(path)


@torch.no_grad()
def test_text_to_image_two_prompts(tiny_pipeline, tmp_path, run_job):
    images, _ = run_job(tmp_path, {"path": str(tiny_pipeline[0])}, prompt=["a red cat", "a dog"], batch_size=2,
                        height=32, width=48, sampling_steps=3)
    assert images.shape == (2, 3, 32, 48)
    check_golden(GOLDEN / "flux1-text-to-image.safetensors", {"images": images})


@torch.no_grad()
def test_true_cfg(tiny_pipeline, tmp_path, run_job):
    images, _ = run_job(tmp_path, {"path": str(tiny_pipeline[0])}, negative_prompt="blurry", cfg_scale=2.0,
                        height=32, width=32, sampling_steps=2)
    check_golden(GOLDEN / "flux1-true-cfg.safetensors", {"images": images})


@torch.no_grad()
def test_img2img(tiny_pipeline, tmp_path, run_job):
    init = random_png(tmp_path / "init.png", 32, 48, seed=4)
    images, _ = run_job(tmp_path, {"path": str(tiny_pipeline[0])}, init_image=init, strength=0.5, height=32,
                        width=48, sampling_steps=4)
    check_golden(GOLDEN / "flux1-img2img.safetensors", {"images": images})


@torch.no_grad()
def test_kontext_reference(tiny_pipeline, tmp_path, run_job):
    ref = random_png(tmp_path / "ref.png", 24, 40, seed=1)
    model = {"path": str(tiny_pipeline[0]), "variant": "kontext-dev", "resize_references": False}
    images, _ = run_job(tmp_path, model, reference_image=ref, height=32, width=32, sampling_steps=2)
    check_golden(GOLDEN / "flux1-kontext.safetensors", {"images": images})


@torch.no_grad()
def test_fill_and_canny(image_variants, tiny_pipeline, tmp_path, run_job):
    folder = image_variants[0]
    image = random_png(tmp_path / "image.png", 64, 48, seed=2)
    mask = np.zeros((64, 48), dtype=np.uint8)
    mask[16:48, 8:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    fill, _ = run_job(tmp_path / "fill", {"path": str(folder / "flux1-fill-tiny.safetensors"), "variant": "fill-dev",
                                          "text_encoders": str(tiny_pipeline[0])},
                      image=image, mask=str(tmp_path / "mask.png"), height=64, width=48, sampling_steps=2)
    control = random_png(tmp_path / "edges.png", 32, 48, seed=3)
    canny, _ = run_job(tmp_path / "canny", {"path": str(folder / "flux1-canny-tiny.safetensors"),
                                            "text_encoders": str(tiny_pipeline[0])},
                       image=control, height=32, width=48, sampling_steps=2)
    check_golden(GOLDEN / "flux1-fill-canny.safetensors", {"fill": fill, "canny": canny})
