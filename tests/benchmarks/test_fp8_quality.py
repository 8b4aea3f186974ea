"""benchmarks/fp8_quality.py on tiny configurations: every row prints, bf16 is far closer to
float32 than the rounding to fp8 is, and fp8 weights take less memory."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "fp8_quality.py"


def test_tiny_run_prints_every_row():
    out = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--size", "64"], capture_output=True, text=True,
                         cwd=SCRIPT.parent, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.rstrip(" |").split(" | ") for line in out.stdout.splitlines() if line.startswith("| flux2") or
            line.startswith("| sdxl")]
    assert [(r[0], r[1]) for r in rows] == [(f"| {n}", w) for n in ("flux2-klein-4b", "sdxl-base")
                                            for w in ("bf16", "fp8 weights, bf16 matmuls", "fp8 matmuls")]
    for bf16, stored, multiplied in (rows[:3], rows[3:]):
        assert 0 < float(bf16[3]) < 0.05 and 0 < float(stored[3]) < 0.2 and 0 < float(multiplied[3]) < 0.2
        assert float(stored[4]) > 1e-3   # the weights really were rounded to fp8
