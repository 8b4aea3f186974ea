"""``pip install diffcore-flux2`` works on its own: the core and flux2 wheels are built, installed
into a fresh virtual environment, and that environment lists the plugin and runs a tiny job.

The venv is isolated: besides the two wheels it holds only links to the distributions of the
running environment that they require (``diffcore.testing.wheels``), so diffcore and
diffcore_flux2 must come from the wheels, never from this editable checkout, and the test checks
that they do and that no other plugin is visible. Marked ``packaging`` (deselect with
``-m "not packaging"``); about 30 s on two cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffcore.api import save_file_atomic
from diffcore.testing import plugins_for_test, run_job_file as run
from diffcore.testing.wheels import source_wheels, wheel_venv
from diffcore_flux2 import __version__
from diffcore_flux2.model import VARIANTS, Flux2
from diffcore_flux2.vae import AE_VARIANTS, AutoEncoder

pytestmark = pytest.mark.packaging

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
    wheels = source_wheels(tmp_path / "dist", "flux2")
    assert wheels[1].name == f"diffcore_flux2-{__version__}-py3-none-any.whl"
    venv = wheel_venv(tmp_path / "venv", wheels)
    assert {"torch", "transformers", "cattrs"} <= set(venv.linked) and "diffcore" not in venv.linked

    probe = ("import json, importlib.metadata as md, diffcore, diffcore_flux2; print(json.dumps({"
             "'files': [diffcore.__file__, diffcore_flux2.__file__], 'version': md.version('diffcore-flux2'), "
             "'requires': md.requires('diffcore-flux2'), 'dists': sorted(d.metadata['Name'] for d in md.distributions())}))")
    found = json.loads(venv.run("python", "-c", probe).stdout)
    for file in map(Path, found["files"]):   # installed from the wheels: real files in the venv, no links
        assert file.is_relative_to(venv.site) and file.resolve().is_relative_to(venv.site.resolve()), found
    assert found["version"] == __version__
    assert {r for r in found["requires"] if "extra ==" not in r} == REQUIRES
    assert sorted(found["dists"]) == sorted(["diffcore", "diffcore-flux2", *venv.linked])

    listing = json.loads(venv.run("diffcore", "plugins", "--json").stdout)
    assert {row["distribution"] for row in listing} == {"diffcore", "diffcore-flux2"}   # no other plugin
    (flux2,) = [row for row in listing if row["name"] == "flux2"]
    assert (flux2["distribution"], flux2["version"], flux2["error"]) == ("diffcore-flux2", __version__, None)
    assert flux2["registered"] == {"models": ["flux2"], "schedules": ["flux2", "flux"]}
    assert f"flux2 (diffcore-flux2 {__version__})" in venv.run("diffcore", "plugins").stdout

    model = _tiny_model(tmp_path / "tiny-flux2", tiny_llm)
    jobs = {where: tmp_path / f"job-{where}.toml" for where in ("venv", "checkout")}
    for where, job in jobs.items():
        job.write_text(JOB.format(out=tmp_path / f"out-{where}", model=model))
    venv.run("diffcore", "run", jobs["venv"])
    with plugins_for_test():
        run(jobs["checkout"])
    made = Image.open(tmp_path / "out-venv" / "sample-0000.png")
    params = json.loads(made.text["parameters"])
    assert made.size == (32, 32) and params["model"] == "flux2" and params["sampling_steps"] == 2
    assert params["cfg_scale"] == 4.0  # the tiny klein-base's default true CFG, with none set in the job
    assert made.tobytes() == Image.open(tmp_path / "out-checkout" / "sample-0000.png").tobytes()
