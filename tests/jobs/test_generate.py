"""The generate job on the DiT family: class grids, seeds, PNG parameters, img2img."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from diffcore.errors import ConfigError
from diffcore.io.images import save_png
from diffcore.jobs.runner import run
from diffcore.testing import plugins_for_test

pytest.importorskip("diffcore_dit")

TINY = """
[job]
kind = "generate"
output_dir = "{out}"
sampling_steps = 3
cfg_scale = 2.0
progress = false
{extra}
[model]
family = "dit"
variant = "digits"
hidden = 32
depth = 1
heads = 2
"""


@pytest.fixture(autouse=True)
def plugins():
    with plugins_for_test() as pm:
        yield pm


def job(tmp_path, extra="", name="job.toml"):
    path = tmp_path / name
    path.write_text(TINY.format(out=tmp_path / "out", extra=extra))
    return path


def test_class_grid_writes_one_row_per_class(tmp_path):
    images = run(job(tmp_path, "class_grid = true\nsamples_per_class = 2"))
    assert images.shape == (20, 1, 8, 8)
    out = tmp_path / "out"
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 8 + 3 * 2, 10 * 8 + 11 * 2)
    params = json.loads(Image.open(out / "sample-0003.png").text["parameters"])
    assert params["class_label"] == 1 and params["sampling_steps"] == 3 and params["cfg_scale"] == 2.0


def test_same_seed_same_images_and_seeds_list(tmp_path):
    a = run(job(tmp_path, "num_samples = 3\nseed = 5"))
    b = run(job(tmp_path, "num_samples = 3\nseed = 5"))
    assert torch.equal(a, b)
    both = run(job(tmp_path, "num_samples = 3\nseeds = [5, 6]"))
    assert both.shape[0] == 6 and torch.equal(both[:3], a) and not torch.equal(both[3:], a)


def test_class_label_out_of_range_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="class_label 12 is out of range: this model has 10 classes"):
        run(job(tmp_path, "class_label = 12"))


def test_img2img_starts_strength_of_the_way_from_the_end(tmp_path):
    init = torch.linspace(-1, 1, 64).reshape(1, 8, 8)
    save_png(tmp_path / "init.png", init, {})
    path = job(tmp_path, f'num_samples = 2\ninit_image = "{tmp_path / "init.png"}"\nstrength = 0.5')
    images = run(path, ["job.sampling_steps=4", "job.cfg_scale=1.0"])
    params = json.loads(Image.open(tmp_path / "out" / "sample-0000.png").text["parameters"])
    assert params["strength"] == 0.5
    # a fresh DiT predicts zero velocity (zero-initialised output), so Euler keeps its start:
    # 4 flow steps at strength 0.5 start at sigma 0.5 -> 0.5 * image + 0.5 * noise
    quantised = ((init + 1) * 127.5).round() / 127.5 - 1
    noise = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(images, (0.5 * quantised + 0.5 * noise).clamp(-1, 1), atol=1e-6, rtol=0)


def test_missing_init_image_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read image"):
        run(job(tmp_path, 'init_image = "nope.png"'))


def test_old_setting_names_still_work_with_a_warning(tmp_path):
    """``num_steps`` (generate, train-guidance), ``sample_steps`` and ``final_grid.steps`` (train)
    are ``sampling_steps`` now; the old names run, say so, and the resolved config has the new one."""
    from diffcore.jobs import RenamedSetting
    from diffcore.jobs.runner import prepare

    path = job(tmp_path, "")
    path.write_text(path.read_text().replace("sampling_steps = 3", "num_steps = 3"))
    with pytest.warns(RenamedSetting, match=r"job.num_steps is now job.sampling_steps"):
        prepared = prepare(path)
    assert prepared.config.job.sampling_steps == 3 and "num_steps" not in prepared.resolved()["job"]
    with pytest.raises(ConfigError, match="num_steps is the old name of sampling_steps; give sampling_steps only"):
        prepare(path, ["job.sampling_steps=4"])
    with pytest.warns(RenamedSetting), pytest.raises(ConfigError, match=r"at job.num_steps: .*'num_steps' must be > 0"):
        prepare(path, ["job.num_steps=0"])       # a mistake in an old name is reported in that name
    train = tmp_path / "train.toml"
    train.write_text('[job]\nkind = "train"\nsample_steps = 4\nfinal_grid = {steps = 6}\n'
                     '[model]\nfamily = "dit"\n[dataset]\nname = "digits"\n')
    with pytest.warns(RenamedSetting) as seen:
        settings = prepare(train).config.job
    assert (settings.sampling_steps, settings.final_grid.sampling_steps) == (4, 6) and len(seen) == 2
