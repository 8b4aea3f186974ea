"""The generate job's ``cfg_scale``: unset means the model's ``default_cfg_scale``, set wins."""

from __future__ import annotations

import json

import attrs
import pytest
import torch
from PIL import Image

from diffcore.api import hookimpl
from diffcore.jobs.runner import run
from diffcore.models import ModelBundle
from diffcore.registry import NoConfig
from diffcore.testing import plugins_for_test

JOB = """
[job]
kind = "generate"
output_dir = "{out}"
num_samples = 1
sampling_steps = 2
progress = false
{extra}
[model]
family = "{family}"
"""


class Recorder(torch.nn.Module):
    """Predicts 0 for the cond branch and 1 for uncond, and counts the rows it sees per branch."""

    def __init__(self):
        super().__init__()
        self.rows = {"cond": 0, "uncond": 0}

    def forward(self, x, sigma, label):
        for value, key in ((0, "cond"), (1, "uncond")):
            self.rows[key] += int((label == value).sum())
        return label.to(x).reshape(-1, 1, 1, 1).expand_as(x).clone()


@attrs.define(eq=False)
class ToyBundle(ModelBundle):
    default_sampling_steps: int = 2

    def conditions(self, request):
        return {"cond": {"label": torch.zeros(request.batch)}, "uncond": {"label": torch.ones(request.batch)}}

    def latent_shape(self, request):
        return (1, 2, 2)


@attrs.define(eq=False)
class DefaultCFGBundle(ToyBundle):
    default_cfg_scale: float = 3.0


class ToyModels:
    networks: list[Recorder] = []

    @staticmethod
    def _build(cls):
        def factory(config, device="cpu"):
            ToyModels.networks.append(Recorder())
            return cls(network=ToyModels.networks[-1])
        return factory

    @hookimpl
    def register_models(register):
        register("toy-default-cfg", ToyModels._build(DefaultCFGBundle), config=NoConfig, description="CFG 3 default")
        register("toy-plain", ToyModels._build(ToyBundle), config=NoConfig, description="no CFG default")


@pytest.fixture(autouse=True)
def plugins():
    ToyModels.networks.clear()
    with plugins_for_test(ToyModels) as pm:
        yield pm


def _run(tmp_path, family, extra=""):
    path = tmp_path / "job.toml"
    path.write_text(JOB.format(out=tmp_path / "out", family=family, extra=extra))
    images = run(path)
    params = json.loads(Image.open(tmp_path / "out" / "sample-0000.png").text["parameters"])
    return images, params, ToyModels.networks[-1].rows


def test_unset_cfg_scale_uses_the_models_default(tmp_path):
    images, params, rows = _run(tmp_path, "toy-default-cfg")
    assert params["cfg_scale"] == 3.0
    assert rows == {"cond": 2, "uncond": 2}  # one cond and one uncond row per step
    # flow from sigma 1 to 0, raw cond 0 and uncond 1: the guided velocity is 1 + 3 (0 - 1) = -2
    # throughout, so Euler ends at noise + 2 (the toy bundle decodes latents as they are)
    noise = torch.randn((1, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(images, (noise + 2).clamp(-1, 1))


def test_job_cfg_scale_overrides_the_default(tmp_path):
    _, params, rows = _run(tmp_path, "toy-default-cfg", "cfg_scale = 1.0")
    assert params["cfg_scale"] == 1.0 and rows == {"cond": 2, "uncond": 0}


def test_models_without_a_default_run_without_cfg(tmp_path):
    _, params, rows = _run(tmp_path, "toy-plain")
    assert params["cfg_scale"] == 1.0 and rows == {"cond": 2, "uncond": 0}
    _, params, rows = _run(tmp_path, "toy-plain", "cfg_scale = 2.5")
    assert params["cfg_scale"] == 2.5 and rows == {"cond": 2, "uncond": 2}
