"""``pip install diffcore-sdxl`` works on its own: the core and sdxl wheels are built, installed
into an isolated virtual environment (``diffcore.testing.wheels``: besides the wheels only links
to the distributions they require), which lists the plugin and runs a tiny generate job giving the
same image as this checkout. Marked ``packaging`` (deselect with ``-m "not packaging"``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import diffcore_sdxl.plugin as sdxl_plugin
from diffcore.testing import plugins_for_test, run_job_file
from diffcore.testing.wheels import source_wheels, wheel_venv
from diffcore_sdxl import __version__

pytestmark = pytest.mark.packaging

# what the sdxl wheel may depend on: the core in its compatible range, and what the plugin imports
REQUIRES = {"diffcore<0.4,>=0.3", "einops>=0.8", "transformers>=4.44"}

JOB = """
[job]
kind = "generate"
output_dir = "{out}"
prompt = "a red cat"
negative_prompt = "blurry"
num_samples = 1
sampling_steps = 2
height = 16
width = 16
progress = false
grid = false

[model]
family = "sdxl"
path = "{model}"
dtype = "float32"
"""


def test_wheels_install_alone_list_the_plugin_and_run_a_job(tmp_path, tiny_pipelines):
    wheels = source_wheels(tmp_path / "dist", "sdxl")
    assert wheels[1].name == f"diffcore_sdxl-{__version__}-py3-none-any.whl"
    venv = wheel_venv(tmp_path / "venv", wheels)
    assert {"torch", "transformers", "einops"} <= set(venv.linked) and "diffcore" not in venv.linked

    probe = ("import json, importlib.metadata as md, diffcore, diffcore_sdxl; print(json.dumps({"
             "'files': [diffcore.__file__, diffcore_sdxl.__file__], 'version': md.version('diffcore-sdxl'), "
             "'requires': md.requires('diffcore-sdxl')}))")
    found = json.loads(venv.run("python", "-c", probe).stdout)
    for file in map(Path, found["files"]):   # installed from the wheels: real files in the venv, no links
        assert file.is_relative_to(venv.site) and file.resolve().is_relative_to(venv.site.resolve()), found
    assert found["version"] == __version__
    assert {r for r in found["requires"] if "extra ==" not in r} == REQUIRES

    listing = json.loads(venv.run("diffcore", "plugins", "--json").stdout)
    assert {row["distribution"] for row in listing} == {"diffcore", "diffcore-sdxl"}   # no other plugin
    (sdxl,) = [row for row in listing if row["name"] == "sdxl"]
    assert (sdxl["distribution"], sdxl["version"], sdxl["error"]) == ("diffcore-sdxl", __version__, None)
    assert sdxl["registered"] == {"models": ["sdxl"], "jobs": ["sdxl-convert"]}

    folder, _ = tiny_pipelines["base"]
    jobs = {where: tmp_path / f"job-{where}.toml" for where in ("venv", "checkout")}
    for where, job in jobs.items():
        job.write_text(JOB.format(out=tmp_path / f"out-{where}", model=folder))
    venv.run("diffcore", "run", jobs["venv"])
    with plugins_for_test(sdxl_plugin):
        run_job_file(jobs["checkout"])
    made = Image.open(tmp_path / "out-venv" / "sample-0000.png")
    params = json.loads(made.text["parameters"])
    assert made.size == (16, 16) and params["model"] == "sdxl" and params["sampling_steps"] == 2
    assert params["cfg_scale"] == 5.0   # the family's default CFG, none set in the job
    assert made.tobytes() == Image.open(tmp_path / "out-checkout" / "sample-0000.png").tobytes()
