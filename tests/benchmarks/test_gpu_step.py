"""benchmarks/gpu_step.py: refuses without CUDA (nothing in CI needs a GPU), and its whole
measuring code runs on tiny configurations on a CPU, both implementations giving one output."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu_step.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=SCRIPT.parent, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_refuses_without_cuda():
    out = run("--cases", "flux1-dev")
    assert out.returncode == 1 and "no CUDA device" in out.stderr and "Traceback" not in out.stderr
    out = run("--device", "cpu")
    assert out.returncode == 1 and "--tiny" in out.stderr


def test_tiny_run_on_cpu_prints_every_row():
    pytest.importorskip("diffusers")
    out = run("--tiny", "--device", "cpu", "--iters", "2", "--warmup", "0", "--cases", "flux1-dev", "sdxl-base",
              "--generate", "--fp8", "--profile")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| flux1") or line.startswith("| sdxl")]
    eager = [line for line in rows if " eager " in line]
    fp8 = [line for line in rows if " fp8 " in line]
    assert len(rows) == 7 and len(eager) == 2 and len(fp8) == 4, out.stdout
    for line in eager:
        ratio, difference = line.split(" | ")[3], line.split(" | ")[5]
        assert float(ratio) > 0 and float(difference) < 1e-4   # the same weights on both sides
    for line in fp8:
        assert float(line.split(" | ")[3]) > 0 and 1e-4 < float(line.split(" | ")[5]) < 1   # fp8's rounding
    profiles = [line for line in out.stdout.splitlines() if "kernels of one forward" in line]
    assert len(profiles) == 2 and re.search(r"\| aten::\w+ \| \d+ \| [\d.]+ \| \d+ \| [\d.]+ \|", out.stdout)
    assert re.search(r"28-step generate.*\| \d+ ms \| \d+ ms \| [\d.]+ \|", rows[-1])
