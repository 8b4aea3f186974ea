"""``pip install diffcore-flux2`` works on its own: the core and flux2 wheels are built, installed
into a fresh virtual environment, and that environment lists the plugin and runs a tiny job.

The environment reuses the installed torch and transformers (``--system-site-packages``); the
wheels go in with ``--no-deps --no-index --ignore-installed``, so diffcore and diffcore_flux2
must come from the wheels, never from this editable checkout, and the test checks that they do.
Sources are copied before building, so no ``build/`` or ``*.egg-info`` lands in the checkout.
Marked ``packaging`` (deselect with ``-m "not packaging"``); about 30 s on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffcore.api import save_file_atomic
from diffcore.testing import plugins_for_test, run_job_file as run
from diffcore_flux2 import __version__
from diffcore_flux2.model import VARIANTS, Flux2
from diffcore_flux2.vae import AE_VARIANTS, AutoEncoder

pytestmark = pytest.mark.packaging

PLUGIN = Path(__file__).resolve().parents[1]
REPO = PLUGIN.parents[1]
JUNK = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", "tests")
# what the flux2 wheel may depend on: the core in its compatible range, and what the plugin imports
REQUIRES = {"diffcore<0.4,>=0.3", "einops>=0.8", "transformers>=4.50"}

JOB = """
[job]
kind = "generate"
output_dir = "{out}"
prompt = "a red cat"
num_samples = 1
sampling_steps = 2
height = 32
width = 32
progress = false
grid = false

[model]
family = "flux2"
path = "{model}"
dtype = "float32"
max_sequence_length = 8
"""


def _sh(*args, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _wheel(src: Path, out: Path) -> Path:
    _sh(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, src)
    (wheel,) = out.glob("*.whl")
    return wheel


def _tiny_model(root: Path, tiny_llm) -> Path:
    """A diffusers-style folder: tiny klein-base transformer and autoencoder in BFL's layout, and a
    tiny Qwen3 text encoder with its tokenizer."""
    torch.manual_seed(0)
    for name, module, file in (("transformer", Flux2(VARIANTS["tiny-klein"]), "diffusion_pytorch_model.safetensors"),
                               ("vae", AutoEncoder(AE_VARIANTS["tiny"]), "ae.safetensors")):
        (root / name).mkdir(parents=True)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(1.0 if p.ndim == 1 else 0.0, 0.1)
        save_file_atomic(module.state_dict(), root / name / file)
    model, tokenizer = tiny_llm
    model.save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    return root


def test_wheels_install_alone_list_the_plugin_and_run_a_job(tmp_path, tiny_llm):
    src = tmp_path / "src"
    shutil.copytree(REPO / "core", src / "core" / "core", ignore=JUNK)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / "core" / name)
    shutil.copytree(PLUGIN, src / "flux2", ignore=JUNK)
    wheels = [_wheel(src / "core", tmp_path / "dist-core"), _wheel(src / "flux2", tmp_path / "dist-flux2")]
    assert wheels[1].name == f"diffcore_flux2-{__version__}-py3-none-any.whl"

    venv = tmp_path / "venv"
    _sh(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv)
    python, cli = venv / "bin" / "python", venv / "bin" / "diffcore"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "DIFFCORE_LOAD_PLUGINS")}
    _sh(python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "--no-cache-dir",
        "--disable-pip-version-check", "--quiet", *wheels, env=env, cwd=tmp_path)

    probe = ("import json, importlib.metadata as md, diffcore, diffcore_flux2; print(json.dumps({"
             "'diffcore': diffcore.__file__, 'flux2': diffcore_flux2.__file__, "
             "'version': md.version('diffcore-flux2'), 'requires': md.requires('diffcore-flux2')}))")
    found = json.loads(_sh(python, "-c", probe, env=env, cwd=tmp_path).stdout)
    site = str(venv.resolve())
    assert found["diffcore"].startswith(site) and found["flux2"].startswith(site), found
    assert found["version"] == __version__
    assert {r for r in found["requires"] if "extra ==" not in r} == REQUIRES

    listing = json.loads(_sh(cli, "plugins", "--json", env=env, cwd=tmp_path).stdout)
    (flux2,) = [row for row in listing if row["name"] == "flux2"]
    assert (flux2["distribution"], flux2["version"], flux2["error"]) == ("diffcore-flux2", __version__, None)
    assert flux2["registered"] == {"models": ["flux2"], "schedules": ["flux2", "flux"]}
    assert f"flux2 (diffcore-flux2 {__version__})" in _sh(cli, "plugins", env=env, cwd=tmp_path).stdout

    model = _tiny_model(tmp_path / "tiny-flux2", tiny_llm)
    jobs = {where: tmp_path / f"job-{where}.toml" for where in ("venv", "checkout")}
    for where, job in jobs.items():
        job.write_text(JOB.format(out=tmp_path / f"out-{where}", model=model))
    _sh(cli, "run", jobs["venv"], env=env, cwd=tmp_path)
    with plugins_for_test():
        run(jobs["checkout"])
    made = Image.open(tmp_path / "out-venv" / "sample-0000.png")
    params = json.loads(made.text["parameters"])
    assert made.size == (32, 32) and params["model"] == "flux2" and params["sampling_steps"] == 2
    assert params["cfg_scale"] == 4.0  # the tiny klein-base's default true CFG, with none set in the job
    assert made.tobytes() == Image.open(tmp_path / "out-checkout" / "sample-0000.png").tobytes()
