"""The third-party path: examples/third_party_guidance installed for real, used by a job file."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from guidance_helpers import TINY

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "third_party_guidance"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip-installs a copy of the example (no network: no deps, no build isolation) into a target dir."""
    root = tmp_path_factory.mktemp("third_party")
    source, target = root / "src", root / "site"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(source)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (target / "diffcore_scheduled_cfg.py").is_file()
    return target


def diffcore(args, target, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "DIFFCORE_STRICT_PLUGINS": "1"}
    return subprocess.run([sys.executable, "-m", "diffcore", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)


def test_the_example_imports_only_the_public_api():
    source = (EXAMPLE / "diffcore_scheduled_cfg.py").read_text()
    imports = [line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert imports == ["attrs", "diffcore.api"]


def test_an_installed_third_party_processor_runs_in_a_job(installed, tmp_path):
    model = "\n".join(f"{k} = {v}" for k, v in TINY.items())
    (tmp_path / "job.toml").write_text(f"""
[job]
kind = "generate"
output_dir = "out"
num_samples = 3
sampling_steps = 3
progress = false

[model]
family = "dit"
{model}

[[guidance]]
name = "scheduled-cfg"
scale = 4.0
power = 2.0
""")
    out = diffcore(["run", "job.toml"], installed, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["config.toml", "grid.png", "sample-0000.png", "sample-0001.png", "sample-0002.png"]
    resolved = (tmp_path / "out" / "config.toml").read_text()
    assert 'name = "scheduled-cfg"' in resolved and "power = 2.0" in resolved
    listed = diffcore(["plugins"], installed, tmp_path)
    assert "scheduled_cfg (diffcore-scheduled-cfg 0.1.0)" in listed.stdout
    assert "guidance: scheduled-cfg" in listed.stdout
