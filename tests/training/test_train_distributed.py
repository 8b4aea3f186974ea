"""Two processes (torchrun, gloo on CPU) against one: data split, gradient average, rank-0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffcore.training.loop import train
from training_standins import ToyImages, full_trainer, settings, tiny_bundle

STEPS = 6
HERE = Path(__file__).parent


def _one_process(out, batch_size, grad_accum):
    bundle = tiny_bundle()
    s = settings(out, steps=STEPS, batch_size=batch_size, grad_accum=grad_accum, checkpoint_every=0)
    trainer = full_trainer(bundle, cond_dropout=0.3)
    result = train(s, bundle=bundle, trainer=trainer, dataset=ToyImages(), output_dir=out)
    return [loss for _, loss in result.losses], bundle.network.state_dict()


def test_two_processes_match_one(tmp_path):
    out = tmp_path / "two"
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "dist_train.py"), str(out), str(STEPS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # rank 0 alone wrote: one log line per step (interrupted at 3, resumed to 6), one set of checkpoints
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == list(range(1, STEPS + 1))
    last = out / "checkpoints" / f"step-{STEPS:06d}"
    state = json.loads((last / "state.json").read_text())
    assert state["world_size"] == 2 and state["samples"] == STEPS * 8
    assert len(torch.load(last / "rng.pt", weights_only=True)) == 2
    two_losses, two_weights = [x["loss"] for x in log], load_file(last / "model.safetensors")

    # 2 processes x 4 samples == 1 process x 2 micro batches of 4: same data, same noise, same gradient
    losses, weights = _one_process(tmp_path / "one", batch_size=4, grad_accum=2)
    torch.testing.assert_close(torch.tensor(two_losses), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    for k, w in weights.items():
        torch.testing.assert_close(two_weights[k], w, rtol=1e-4, atol=1e-5, msg=k)

    # 1 process x 8 samples: the same samples per step, but other noise draws: equal in distribution
    losses8, _ = _one_process(tmp_path / "eight", batch_size=8, grad_accum=1)
    mean2, mean8 = sum(two_losses) / STEPS, sum(losses8) / STEPS
    assert abs(mean2 - mean8) / mean8 < 0.25, (two_losses, losses8)
