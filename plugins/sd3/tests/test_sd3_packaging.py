"""``pip install diffcore-sd3`` works on its own: the core and sd3 wheels are built, installed into
an isolated virtual environment (``diffcore.testing.wheels``: besides the wheels only links to the
distributions they require), which lists the plugin and runs a tiny generate job giving the same
image as this checkout. Marked ``packaging`` (deselect with ``-m "not packaging"``)."""

from __future__ import annotations

import pytest

import diffcore_sd3.plugin as sd3_plugin
from diffcore.testing.wheels import installed_alone, same_image

pytestmark = pytest.mark.packaging

# what the sd3 wheel may depend on: the core in its compatible range, and what the plugin imports
REQUIRES = {"diffcore<0.4,>=0.3", "einops>=0.8", "transformers>=4.44"}

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
family = "sd3"
path = "{model}"
dtype = "float32"
max_sequence_length = 8

[[guidance]]
name = "slg"
layers = [1]
start = 0.0
stop = 1.0
"""


def test_wheels_install_alone_list_the_plugin_and_run_a_job(tmp_path, tiny_pipeline):
    venv = installed_alone(tmp_path, "sd3", requires=REQUIRES, registered={
        "models": ["sd3"], "schedules": ["sd3"], "guidance": ["slg"], "jobs": ["sd3-convert"]})
    assert {"torch", "transformers", "einops"} <= set(venv.linked)
    folder, _ = tiny_pipeline
    made, params = same_image(venv, JOB.replace("{model}", str(folder)), tmp_path, sd3_plugin)
    assert made.size == (32, 32) and params["model"] == "sd3" and params["sampling_steps"] == 2
    assert params["cfg_scale"] == 4.5   # the tiny variant's default CFG, none set in the job
