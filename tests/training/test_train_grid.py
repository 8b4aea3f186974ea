"""The train job's final grid enlarged for people (``final_grid.upscale``), as the digits demo asks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffcore.config.structure import structure
from diffcore.errors import ConfigError
from diffcore.io.images import read_params
from diffcore.jobs import JobContext
from diffcore.jobs.runner import prepare
from diffcore.jobs.train import TrainJob, run_train

pytest.importorskip("diffcore_dit")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
TINY = {"model": {"family": "dit", "variant": "digits", "hidden": 32, "depth": 1, "heads": 2},
        "dataset": {"name": "digits"}}


def test_the_final_grid_is_enlarged_and_the_original_size_kept(tmp_path):
    job = {"output_dir": str(tmp_path), "device": "cpu", "steps": 1, "batch_size": 8, "checkpoint_every": 0,
           "final_grid": {"samples_per_class": 2, "sampling_steps": 2, "upscale": 4}}
    config = structure({"job": job, **TINY}, TrainJob)
    run_train(config, JobContext(file=None, output_dir=tmp_path, resolved={}))
    with Image.open(tmp_path / "grid-small.png") as im:
        small = np.array(im)
        assert im.size == (2 * 10 + 2, 10 * 10 + 2)   # 2 per row, 8x8 pixels, 2 px apart
    with Image.open(tmp_path / "grid.png") as im:
        big = np.array(im)
    assert big.shape == (4 * small.shape[0], 4 * small.shape[1])
    assert (big == small.repeat(4, axis=0).repeat(4, axis=1)).all()   # nearest neighbour: blocks, no blur
    assert small.std() > 0
    assert read_params(tmp_path / "grid.png") == read_params(tmp_path / "grid-small.png") | {"upscale": 4}


def test_upscale_is_checked_and_the_demo_asks_for_a_visible_grid():
    for bad in (0, 33):
        with pytest.raises(ConfigError, match=r"job\.final_grid\.upscale"):
            structure({"job": {"final_grid": {"upscale": bad}}, **TINY}, TrainJob)
    demo = prepare(ROOT / "examples" / "digits" / "train.toml")
    assert demo.config.job.final_grid.upscale == 8   # 8x8 digits drawn 64 px wide
