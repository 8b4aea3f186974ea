"""The CLI end to end: `diffcore run --processes 2` trains a tiny DiT on two processes, then a
generate job samples from the checkpoint that run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

pytest.importorskip("diffcore_dit")

MODEL = """
[model]
family = "dit"
variant = "digits"
hidden = 32
depth = 1
heads = 2
{checkpoint}
"""


def diffcore(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "diffcore", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_two_process_training_then_generate_from_its_checkpoint(tmp_path):
    (tmp_path / "train.toml").write_text("""
[job]
kind = "train"
output_dir = "run"
steps = 4
batch_size = 8
lr = 1e-3
log_every = 1
checkpoint_every = 2
final_grid = { samples_per_class = 1, sampling_steps = 2 }
[dataset]
name = "digits"
""" + MODEL.format(checkpoint=""))
    result = diffcore("run", "--processes", "2", "train.toml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]          # rank 0 alone writes
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert Image.open(tmp_path / "run" / "grid.png").size == (8 + 2 * 2, 10 * 8 + 11 * 2)

    (tmp_path / "generate.toml").write_text("""
[job]
kind = "generate"
output_dir = "samples"
class_label = 3
num_samples = 2
sampling_steps = 2
""" + MODEL.format(checkpoint='checkpoint = "run"'))
    result = diffcore("run", "generate.toml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    params = json.loads(Image.open(tmp_path / "samples" / "sample-0001.png").text["parameters"])
    assert params["class_label"] == 3


def test_checkpoint_that_does_not_fit_is_a_one_line_error(tmp_path):
    (tmp_path / "generate.toml").write_text('[job]\nkind = "generate"\n' + MODEL.format(
        checkpoint=f'checkpoint = "{tmp_path / "missing"}"'))
    result = diffcore("run", "generate.toml", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "does not exist" in result.stderr
