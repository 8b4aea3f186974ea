"""The ``train`` job end to end: the real DiT family, the digits dataset, the sampling engine."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from diffcore.config.structure import structure
from diffcore.errors import ConfigError
from diffcore.io.images import read_params
from diffcore.jobs import JobContext
from diffcore.jobs.train import FinalGrid, TrainJob, TrainSettings, run_train
from diffcore.plugins import registry

pytest.importorskip("diffcore_dit")
pytest.importorskip("sklearn")

TINY_DIT = {"family": "dit", "variant": "digits", "hidden": 32, "depth": 1, "heads": 2}


def test_job_table_structures_with_defaults():
    job = structure({"job": {"steps": 5, "optimizer": "muon", "final_grid": {"samples_per_class": 2}},
                     "model": TINY_DIT, "dataset": {"name": "digits"}}, TrainJob)
    assert (job.trainer.name, job.sampler.name, job.schedule) == ("full", "euler", None)   # None: the model's schedule
    assert job.trainer.config.cond_dropout == 0.1 and job.model.config.hidden == 32
    assert job.job.steps == 5 and job.job.resume is None and job.job.final_grid.samples_per_class == 2
    with pytest.raises(ConfigError, match=r"job\.steps.*must be > 0"):
        structure({"job": {"steps": 0}, "model": TINY_DIT, "dataset": {"name": "digits"}}, TrainJob)
    with pytest.raises(ConfigError, match=r"job\.mixed_precision.*'no', 'bf16'"):
        structure({"job": {"mixed_precision": "fp16"}, "model": TINY_DIT, "dataset": {"name": "digits"}}, TrainJob)
    with pytest.raises(ConfigError, match="missing required table"):
        structure({"job": {}, "model": TINY_DIT}, TrainJob)
    with pytest.raises(ValueError):
        TrainSettings(ema_decay=1.0)


def _spec(kind, name, **config):
    from diffcore.config.spec import Spec

    component = registry(kind).get(name)
    return Spec(component, component.config(**config))


def test_train_job_writes_checkpoints_previews_and_a_class_grid(tmp_path):
    settings = TrainSettings(output_dir=str(tmp_path), device="cpu", seed=1, steps=4, batch_size=16, lr=1e-3,
                             validate_every=2, sampling_steps=2, checkpoint_every=2, keep_last=1, log_every=2,
                             final_grid=FinalGrid(samples_per_class=2, cfg_scale=2.0, sampling_steps=3))
    config = TrainJob(job=settings, model=_spec("models", "dit", hidden=32, depth=1, heads=2),
                      dataset=_spec("datasets", "digits"), trainer=_spec("trainers", "full"),
                      sampler=_spec("samplers", "euler"), schedule=_spec("schedules", "flow"))
    result = run_train(config, JobContext(file=None, output_dir=tmp_path, resolved={"job": {"steps": 4}}))
    assert result.step == 4 and [s for s, _ in result.losses] == [2, 4]

    grid = tmp_path / "grid.png"
    params = read_params(grid)
    assert params["weights"] == "ema" and params["sampling_steps"] == 3 and params["cfg_scale"] == 2.0
    with Image.open(grid) as im:   # 10 classes, one per row, 2 samples each, 8x8 pixels, 2 px apart
        assert im.size == (2 * 10 + 2, 10 * 10 + 2) and im.mode == "L"
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-000002.png", "step-000004.png"]
    assert read_params(tmp_path / "samples" / "step-000002.png")["step"] == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000004"]
    saved = json.loads((tmp_path / "checkpoints" / "step-000004" / "config.json").read_text())
    assert saved == {"job": {"steps": 4}}

    # the family loads the checkpoint folder (its EMA weights) for generation
    bundle = _spec("models", "dit", hidden=32, depth=1, heads=2,
                   checkpoint=str(tmp_path / "checkpoints" / "step-000004")).build()
    for name, p in bundle.network.named_parameters():
        assert torch.equal(p, result.ema.shadow[name]), name
