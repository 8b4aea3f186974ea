"""Training killed with SIGKILL at chosen points and resumed with ``resume = "latest"`` ends bit
for bit where a run that was never killed ends: weights, EMA, optimizer, RNG and sampler state,
the log, the previews and the final grid. A half-written checkpoint is never picked and is
cleaned up; nothing temporary is left behind.

The job is the tiny DiT of the digits demo (20 steps, a checkpoint every 5, previews, final grid)
run through ``diffcore run`` in processes forked from one warm interpreter (kill_switch.py), each
of which kills itself at a point named by the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffcore.io.images import read_params
from diffcore.training import state

pytest.importorskip("diffcore_dit")
pytest.importorskip("sklearn")
if not hasattr(os, "fork"):
    pytest.skip("kill_switch.py forks its runs (POSIX only)", allow_module_level=True)

HERE = Path(__file__).parent
JOB = """
[job]
kind = "train"
output_dir = "{out}"
device = "cpu"
seed = 4
steps = 20
batch_size = 8
grad_accum = 2
lr = 2e-3
warmup_steps = 3
lr_schedule = "cosine"
ema_decay = 0.9
checkpoint_every = 5
keep_last = 2
log_every = 1
validate_every = 6
sample_steps = 2

[job.final_grid]
samples_per_class = 2
cfg_scale = 2.0
steps = 3

[model]
family = "dit"
variant = "digits"
hidden = 32
depth = 1
heads = 2

[dataset]
name = "digits"
"""


class Runs:
    """One kill_switch.py process, forking a ``diffcore run`` child per ``run``."""

    def __init__(self) -> None:
        path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, str(HERE / "kill_switch.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})
        self.seconds: list[float] = []

    def run(self, out: Path, point: str | None, resume: bool) -> tuple[int, str]:
        """Train into ``out`` (killed at ``point``); the exit status and what this run printed."""
        job, log = out.parent / f"{out.name}.toml", out.parent / f"{out.name}.log"
        job.write_text(JOB.format(out=out))
        seen = log.stat().st_size if log.exists() else 0
        args = ["run", str(job), *(["--set", 'job.resume="latest"'] if resume else [])]
        t0 = time.perf_counter()
        self.proc.stdin.write(json.dumps({"args": args, "point": point, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, "kill_switch.py died"
        self.seconds.append(time.perf_counter() - t0)
        with open(log) as f:
            f.seek(seen)
            return json.loads(answer)["status"], f.read()

    def kill_at(self, out: Path, point: str, resume: bool = True) -> str:
        status, printed = self.run(out, point, resume)
        assert status == -signal.SIGKILL, f"{point}: the run was not killed, it ended with {status}:\n{printed[-3000:]}"
        return printed

    def finish(self, out: Path, resume: bool = True) -> str:
        status, printed = self.run(out, None, resume)
        assert status == 0, printed[-3000:]
        return printed

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def runs():
    r = Runs()
    yield r
    r.close()
    print(f"\nkill_switch: {len(r.seconds)} runs in {sum(r.seconds):.1f} s (the first one waits for the imports)")


@pytest.fixture(scope="module")
def reference(runs, tmp_path_factory):
    """The run that was never killed."""
    out = tmp_path_factory.mktemp("reference") / "run"
    runs.finish(out, resume=False)
    return out


def latest(out: Path) -> str | None:
    found = state.resolve("latest", out / "checkpoints")
    return None if found is None else found.name


def assert_same_run(out: Path, reference: Path) -> None:
    """Every tensor and number the run left equals the reference's; nothing partial is left."""
    names = [p.name for p in state.list_checkpoints(reference / "checkpoints")]
    assert names == ["step-000015", "step-000020"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == names
    for name in names:
        a, b = out / "checkpoints" / name, reference / "checkpoints" / name
        assert state.incomplete(a) is None
        for weights in ("model.safetensors", "ema.safetensors"):
            assert_equal(load_file(a / weights), load_file(b / weights), f"{name}/{weights}")
        for file in ("optimizer.pt", "rng.pt"):
            assert_equal(torch.load(a / file, weights_only=True), torch.load(b / file, weights_only=True),
                         f"{name}/{file}")
        for text in ("state.json", "scheduler.json"):
            assert json.loads((a / text).read_text()) == json.loads((b / text).read_text()), f"{name}/{text}"
        assert job_settings(a) == job_settings(b)
        got, want = (json.loads((c / state.MANIFEST).read_text())["files"] for c in (a, b))
        assert got.keys() == want.keys() and all(got[f] == want[f] for f in got if f != "config.json")
    assert log_records(out) == log_records(reference)
    for image in ["grid.png", *(f"samples/step-{s:06d}.png" for s in (6, 12, 18))]:
        with Image.open(out / image) as got, Image.open(reference / image) as want:
            assert got.tobytes() == want.tobytes(), image
        assert read_params(out / image) == read_params(reference / image)
    assert [p for p in out.rglob("*") if p.name.endswith(".tmp")] == []


def job_settings(path: Path) -> dict:
    """The checkpoint's resolved config, less what differs by design (the folder, the resume switch)."""
    config = json.loads((path / "config.json").read_text())
    return {**config, "job": {k: v for k, v in config["job"].items() if k not in ("output_dir", "resume")}}


def assert_equal(a, b, where: str) -> None:
    """Nested dicts / lists / tuples of tensors and plain values, tensors compared with torch.equal."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def log_records(out: Path) -> list[tuple]:
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [(x["step"], x["loss"], x["lr"], x["grad_norm"]) for x in lines]


def test_the_reference_run(reference):
    assert [s for s, *_ in log_records(reference)] == list(range(1, 21))
    ema = load_file(reference / "checkpoints" / "step-000020" / "ema.safetensors")
    model = load_file(reference / "checkpoints" / "step-000020" / "model.safetensors")
    assert not torch.equal(ema["final.linear.weight"], model["final.linear.weight"])  # the EMA is its own


def test_kill_during_a_step(runs, reference, tmp_path):
    out = tmp_path / "run"
    runs.kill_at(out, "step:8", resume=False)
    assert latest(out) == "step-000005"
    assert [s for s, *_ in log_records(out)] == list(range(1, 8))     # step 8 died before its log line
    printed = runs.finish(out)
    assert f"resumed from {out / 'checkpoints' / 'step-000005'} at step 5" in printed
    assert_same_run(out, reference)


def test_kill_while_a_checkpoint_is_written(runs, reference, tmp_path):
    out = tmp_path / "run"
    runs.kill_at(out, "file:10:ema.safetensors", resume=False)
    partial = out / "checkpoints" / "step-000010.tmp"
    assert sorted(p.name for p in partial.iterdir()) == ["ema.safetensors", "model.safetensors"]
    assert latest(out) == "step-000005"                                 # the half-written one is never picked
    printed = runs.finish(out)
    assert f"removed {partial}, left by an interrupted run" in printed
    assert "at step 5" in printed
    assert_same_run(out, reference)


def test_kill_while_the_final_grid_is_sampled(runs, reference, tmp_path):
    out = tmp_path / "run"
    runs.kill_at(out, "grid", resume=False)
    assert latest(out) == "step-000020" and not (out / "grid.png").exists()
    printed = runs.finish(out)
    assert "at step 20" in printed                                      # no step is redone, only the grid
    assert_same_run(out, reference)


def test_killed_again_and_again(runs, reference, tmp_path):
    """Five kills in a row, each run resumed with resume = "latest" and killed again, then a last resume."""
    out, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    runs.kill_at(out, "step:3", resume=False)                          # before the first checkpoint
    assert latest(out) is None
    runs.kill_at(out, "file:5:manifest.json")                          # every file written, not yet renamed
    assert (root / "step-000005.tmp" / state.MANIFEST).is_file() and latest(out) is None
    printed = runs.kill_at(out, "publish:15")                          # renamed, older ones not yet pruned
    assert "removed" in printed and "resumed" not in printed           # started afresh, the tmp folder removed
    assert [p.name for p in state.list_checkpoints(root)] == ["step-000005", "step-000010", "step-000015"]
    printed = runs.kill_at(out, "prune:20")                            # an old folder renamed away, not deleted
    assert "at step 15" in printed                                     # its start pruned step 5 (keep_last 2)
    assert sorted(p.name for p in root.iterdir()) == ["step-000010.old.tmp", "step-000015", "step-000020"]
    assert latest(out) == "step-000020"
    printed = runs.kill_at(out, "grid-file")                           # the grid's PNG written, not renamed
    assert f"removed {root / 'step-000010.old.tmp'}, left by an interrupted run" in printed
    [unfinished] = out.glob(".grid.png.*.tmp")
    assert unfinished.stat().st_size > 0 and not (out / "grid.png").exists()
    printed = runs.finish(out)
    assert f"removed {unfinished}, left by an interrupted run" in printed and "at step 20" in printed
    assert_same_run(out, reference)
