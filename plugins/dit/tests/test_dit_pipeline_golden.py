"""Fixed-seed outputs of the generate and train jobs on a tiny random DiT, held bit for bit to the
files in tests/golden/pipeline/ (recorded before the generation pipeline was shared by the jobs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore.api import registry, save_png
from diffcore.testing import plugins_for_test, run_job_file
from diffcore.testing.goldens import check_golden

GOLDEN = Path(__file__).resolve().parents[3] / "tests" / "golden" / "pipeline"
MODEL = 'family = "dit"\nvariant = "digits"\nhidden = 32\ndepth = 2\nheads = 4\ncheckpoint = "{weights}"\n'


@pytest.fixture(autouse=True)
def plugins():
    with plugins_for_test() as pm:
        yield pm


@pytest.fixture
def weights(tmp_path, randomize):
    from safetensors.torch import save_file

    comp = registry("models").get("dit")
    network = randomize(comp.build(comp.config(variant="digits", hidden=32, depth=2, heads=4)).network, seed=3)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(tmp_path / "dit.safetensors"))
    return tmp_path / "dit.safetensors"


def generate(tmp_path, weights, job: str, tables: str = "") -> torch.Tensor:
    path = tmp_path / "job.toml"
    path.write_text(f'[job]\nkind = "generate"\noutput_dir = "{tmp_path / "out"}"\nprogress = false\n{job}\n'
                    f'[model]\n{MODEL.format(weights=weights)}\n{tables}')
    return run_job_file(path)


def test_class_grid(tmp_path, weights):
    images = generate(tmp_path, weights, "class_grid = true\nsamples_per_class = 2\nsampling_steps = 4\n"
                                         "cfg_scale = 2.0\nbatch_size = 8\nseed = 3")
    assert images.shape == (20, 1, 8, 8)
    check_golden(GOLDEN / "dit-class-grid.safetensors", {"images": images})


def test_seeds_schedule_and_guidance_chain(tmp_path, weights):
    images = generate(tmp_path, weights, "seeds = [1, 2]\nclass_label = 7\nnum_samples = 2\nsampling_steps = 3",
                      '[sampler]\nname = "dpmpp_2m"\n[schedule]\nname = "flow"\nshift = 2.0\n'
                      '[[guidance]]\nname = "cfg"\nscale = 1.5\n')
    assert images.shape == (4, 1, 8, 8)
    check_golden(GOLDEN / "dit-seeds-chain.safetensors", {"images": images})


def test_img2img_with_an_ancestral_sampler(tmp_path, weights):
    init = torch.linspace(-1, 1, 64).reshape(1, 8, 8)
    save_png(tmp_path / "init.png", init, {})
    images = generate(tmp_path, weights, f'init_image = "{tmp_path / "init.png"}"\nstrength = 0.6\nsampling_steps = 5\n'
                                         'num_samples = 3\nbatch_size = 2\ncfg_scale = 1.5\nclass_label = 4',
                      '[sampler]\nname = "euler_ancestral"\n')
    check_golden(GOLDEN / "dit-img2img.safetensors", {"images": images})


def test_train_job_previews_and_final_grid(tmp_path):
    pytest.importorskip("sklearn")
    path = tmp_path / "train.toml"
    path.write_text(f'[job]\nkind = "train"\noutput_dir = "{tmp_path / "out"}"\ndevice = "cpu"\nseed = 2\nsteps = 2\n'
                    'batch_size = 16\nlr = 1e-3\nvalidate_every = 1\nsampling_steps = 2\ncheckpoint_every = 0\n'
                    'final_grid = {samples_per_class = 1, cfg_scale = 2.0, sampling_steps = 3}\n'
                    '[model]\nfamily = "dit"\nvariant = "digits"\nhidden = 32\ndepth = 1\nheads = 2\n'
                    '[dataset]\nname = "digits"\n')
    run_job_file(path)
    out = tmp_path / "out"
    pngs = {name: out / name for name in ("grid.png", "samples/step-000001.png", "samples/step-000002.png")}
    check_golden(GOLDEN / "dit-train-grids.safetensors",
                 {name: torch.from_numpy(np.array(Image.open(file))) for name, file in pngs.items()})
