"""``[[control]]`` tables of the generate job: validation, diffusers' start / end rule, and a
family without ControlNets refusing them (the families' own tests run them against diffusers)."""

from __future__ import annotations

import pytest
import torch

from diffcore.config.structure import structure
from diffcore.errors import ConfigError
from diffcore.jobs.generate import GenerateJob
from diffcore.jobs.runner import run
from diffcore.models import Control
from diffcore.testing import plugins_for_test

pytest.importorskip("diffcore_dit")


def controlnet_keep(i: int, n: int, start: float, end: float) -> float:
    """diffusers' StableDiffusionXLControlNetPipeline / FluxControlNetPipeline, word for word."""
    return 1.0 - float(i / n < start or (i + 1) / n > end)


@pytest.mark.parametrize("steps", [1, 4, 7, 28])
@pytest.mark.parametrize("start, end", [(0.0, 1.0), (0.2, 0.8), (0.5, 1.0), (0.0, 0.3), (0.33, 0.34)])
def test_scale_at_is_diffusers_controlnet_keep(steps, start, end):
    control = Control(path="cn", image=torch.zeros(3, 8, 8), scale=0.7, start=start, end=end)
    assert [control.scale_at(i, steps) for i in range(steps)] == \
        [0.7 * controlnet_keep(i, steps, start, end) for i in range(steps)]


@pytest.mark.parametrize("table, message", [
    ({"path": "{tmp}", "image": "{tmp}/missing.png"}, r"control\[0\]\.image: no such file"),
    ({"image": "{tmp}"}, r"control\[0\]\.path: missing required key"),
    ({"path": "{tmp}", "image": "{tmp}", "start": 0.6, "end": 0.5}, r"control\[0\]\.start: start \(0.6\) must be before end"),
    ({"path": "{tmp}", "image": "{tmp}", "scale": -1}, r"control\[0\]\.scale"),
    ({"path": "{tmp}", "image": "{tmp}", "end": 1.5}, r"control\[0\]\.end"),
])
def test_bad_control_tables_name_their_key(tmp_path, table, message):
    table = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in table.items()}
    with plugins_for_test(), pytest.raises(ConfigError, match=message):
        structure({"model": {"family": "dit"}, "control": [table]}, GenerateJob)


def test_a_family_without_controlnets_refuses_them(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "edges.png")
    (tmp_path / "job.toml").write_text(f"""
[job]
kind = "generate"
output_dir = "{tmp_path / 'out'}"
sampling_steps = 1
num_samples = 1
progress = false

[model]
family = "dit"
variant = "digits"
hidden = 32
depth = 1
heads = 2

[[control]]
path = "{tmp_path}"
image = "{tmp_path / 'edges.png'}"
""")
    with plugins_for_test(), pytest.raises(ConfigError, match=r"control.*runs no ControlNets"):
        run(tmp_path / "job.toml")
    assert not (tmp_path / "out" / "sample-0000.png").exists()


def test_canny_preprocessing_gives_the_edge_map_at_the_output_size(tmp_path):
    """``canny = [low, high]``: the control image becomes white-on-black edges (3 channels), computed
    after the resize to height x width; the aspect ratio is checked first."""
    from PIL import Image

    from diffcore.io.images import load_image
    from diffcore.jobs.generate import ControlSettings, GenerateSettings, control_inputs
    from diffcore.nn.control import canny

    image = Image.new("RGB", (64, 32))
    image.paste((255, 255, 255), (16, 8, 48, 24))
    image.save(tmp_path / "photo.png")
    table = ControlSettings(path=str(tmp_path), image=str(tmp_path / "photo.png"), canny=[100, 200])
    (control,) = control_inputs([table], GenerateSettings(height=16, width=32))
    expected = canny(load_image(tmp_path / "photo.png", size=(16, 32))).float() * 2 - 1
    assert control.image.shape == (3, 16, 32) and torch.equal(control.image, expected.expand(3, -1, -1))
    assert expected.max() == 1 and expected.min() == -1
    with pytest.raises(ConfigError, match=r"control\[0\]\.image.*another aspect ratio"):
        control_inputs([table], GenerateSettings(height=32, width=32))
