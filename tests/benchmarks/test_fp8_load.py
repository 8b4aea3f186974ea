"""benchmarks/fp8_load.py on a tiny configuration: both files load both ways into the same fp8
layers, and the table prints every row."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "fp8_load.py"


def test_tiny_run_prints_every_row(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--tiny"], capture_output=True, text=True,
                         cwd=SCRIPT.parent, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.strip(" |").split(" | ") for line in out.stdout.splitlines() if line.startswith("| bf16 file")
            or line.startswith("| fp8 file") or line.startswith("| scaled fp8 file")]
    files = ("bf16 file", "fp8 file (ComfyUI)", "scaled fp8 file (ComfyUI)")
    assert [(r[0], r[1]) for r in rows] == [(f, m) for f in files
                                            for m in ("load, then round", "round while loading")]
    assert len({r[-1] for r in rows}) == 1 and int(rows[0][-1]) > 0   # the same fp8 layers every way
    assert len({r[-2] for r in rows}) == 1                             # and the same weight bytes
