"""Fixed-seed outputs of the generate job on tiny random FLUX.2 models (dev text-to-image,
klein-base's default CFG, inpainting with img2img and a reference, two references), held bit for
bit to the files in tests/golden/pipeline/ (recorded before the generation pipeline was shared
by the jobs)."""

from pathlib import Path

import numpy as np
import torch
import tomli_w
from PIL import Image

from diffcore.testing import plugins_for_test, run_job_file
from diffcore.testing.goldens import check_golden

GOLDEN = Path(__file__).resolve().parents[3] / "tests" / "golden" / "pipeline"


def generate(folder: Path, root: Path, **job) -> torch.Tensor:
    table = {"job": {"kind": "generate", "output_dir": str(folder / "out"), "num_samples": 1, "progress": False,
                     "grid": False, "prompt": "a red cat on the mat", "seed": 5, **job},
             "model": {"family": "flux2", "path": str(root), "dtype": "float32", "max_sequence_length": 16}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.toml").write_text(tomli_w.dumps(table))
    with plugins_for_test():
        return run_job_file(folder / "job.toml")


def png(path: Path, height: int, width: int, seed: int) -> str:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return str(path)


@torch.no_grad()
def test_dev_text_to_image(tmp_path, flux2_folder):
    root, _ = flux2_folder(True)
    images = generate(tmp_path, root, height=32, width=48, sampling_steps=3, num_samples=2, batch_size=2)
    assert images.shape == (2, 3, 32, 48)
    check_golden(GOLDEN / "flux2-dev-text-to-image.safetensors", {"images": images})


@torch.no_grad()
def test_klein_base_editing(tmp_path, flux2_folder):
    root, _ = flux2_folder(False)
    cfg = generate(tmp_path / "cfg", root, height=32, width=32, sampling_steps=2, negative_prompt="blurry")
    image = png(tmp_path / "image.png", 32, 48, seed=4)
    mask = np.zeros((32, 48), dtype=np.uint8)
    mask[8:24, 16:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    reference = png(tmp_path / "reference.png", 64, 64, seed=5)
    inpaint = generate(tmp_path / "inpaint", root, image=image, mask=str(tmp_path / "mask.png"), init_image=image,
                       strength=0.75, reference_image=[reference], sampling_steps=4)
    references = generate(tmp_path / "refs", root, reference_image=[reference, png(tmp_path / "b.png", 64, 96, 6)],
                          height=32, width=32, sampling_steps=2, cfg_scale=2.5)
    check_golden(GOLDEN / "flux2-klein-base-editing.safetensors",
                 {"cfg": cfg, "inpaint": inpaint, "references": references})
