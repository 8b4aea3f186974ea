"""benchmarks/text_fp8_load.py on a tiny T5: the folder loads both ways into the same fp8 layers
and weight bytes, the single fp8 file into none (upcast) or the same layers, and every row prints."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "text_fp8_load.py"


def test_tiny_run_prints_every_row(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--tiny"], capture_output=True, text=True,
                         cwd=SCRIPT.parent, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.strip(" |").split(" | ") for line in out.stdout.splitlines() if line.lower().startswith("| t5")]
    assert [r[1] for r in rows] == ["load, then round", "round while loading", "load (upcast to bf16)",
                                    "round while loading"]
    assert rows[0][-1] == rows[1][-1] == rows[3][-1] and int(rows[0][-1]) > 0 and rows[2][-1] == "0"
    assert rows[0][-2] == rows[1][-2]   # the same weight bytes
