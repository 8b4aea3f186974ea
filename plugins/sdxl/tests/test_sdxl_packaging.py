"""``pip install diffcore-sdxl`` works on its own: the core and sdxl wheels are built, installed
into an isolated virtual environment (``diffcore.testing.wheels``: besides the wheels only links
to the distributions they require), which lists the plugin and runs a tiny generate job giving the
same image as this checkout. Marked ``packaging`` (deselect with ``-m "not packaging"``)."""

from __future__ import annotations

import pytest

import diffcore_sdxl.plugin as sdxl_plugin
from diffcore.testing.wheels import installed_alone, same_image

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
    venv = installed_alone(tmp_path, "sdxl", requires=REQUIRES, registered={"models": ["sdxl"],
                                                                            "jobs": ["sdxl-convert"]})
    assert {"torch", "transformers", "einops"} <= set(venv.linked)
    folder, _ = tiny_pipelines["base"]
    made, params = same_image(venv, JOB.replace("{model}", str(folder)), tmp_path, sdxl_plugin)
    assert made.size == (16, 16) and params["model"] == "sdxl" and params["sampling_steps"] == 2
    assert params["cfg_scale"] == 5.0   # the family's default CFG, none set in the job
