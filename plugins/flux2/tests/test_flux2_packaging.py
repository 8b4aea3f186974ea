"""``pip install diffcore-flux2`` works on its own: the core and flux2 wheels are built, installed
into a fresh virtual environment, and that environment lists the plugin and runs a tiny job.

The venv is isolated: besides the two wheels it holds only links to the distributions of the
running environment that they require (``diffcore.testing.wheels``), so diffcore and
diffcore_flux2 must come from the wheels, never from this editable checkout, and the test checks
that they do and that no other plugin is visible. Marked ``packaging`` (deselect with
``-m "not packaging"``); about 30 s on two cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffcore.api import save_file_atomic
from diffcore.testing.wheels import installed_alone, same_image
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
    venv = installed_alone(tmp_path, "flux2", requires=REQUIRES,
                           registered={"models": ["flux2"], "schedules": ["flux2", "flux"]})
    assert {"torch", "transformers", "cattrs"} <= set(venv.linked)
    model = _tiny_model(tmp_path / "tiny-flux2", tiny_llm)
    made, params = same_image(venv, JOB.replace("{model}", str(model)), tmp_path)
    assert made.size == (32, 32) and params["model"] == "flux2" and params["sampling_steps"] == 2
    assert params["cfg_scale"] == 4.0  # the tiny klein-base's default true CFG, with none set in the job
