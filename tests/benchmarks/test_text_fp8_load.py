"""benchmarks/text_fp8_load.py on a tiny T5: both ways load into the same fp8 layers and weight
bytes, and the table prints both rows."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "text_fp8_load.py"


def test_tiny_run_prints_both_rows(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--tiny"], capture_output=True, text=True,
                         cwd=SCRIPT.parent, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.strip(" |").split(" | ") for line in out.stdout.splitlines() if line.startswith("| T5")]
    assert [r[1] for r in rows] == ["load, then round", "round while loading"]
    assert rows[0][-1] == rows[1][-1] and int(rows[0][-1]) > 0   # the same fp8 layers
    assert rows[0][-2] == rows[1][-2]                            # and the same weight bytes
