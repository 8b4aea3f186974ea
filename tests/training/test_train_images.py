"""PNG grids and the ``parameters`` text chunk (diffcore.io.images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore.io.images import enlarge, make_grid, read_params, save_png, to_pil


def test_png_parameters_round_trip(tmp_path):
    image = torch.linspace(-1, 1, 3 * 5 * 7).reshape(3, 5, 7)
    params = {"model": "dit", "seed": 3, "cfg_scale": 4.0, "prompt": "a \"quoted\" café", "labels": [1, 2]}
    path = save_png(tmp_path / "out" / "a.png", image, params)
    assert read_params(path) == params
    with Image.open(path) as im:
        assert im.size == (7, 5) and im.mode == "RGB"
        assert im.text["parameters"].startswith("{")   # JSON under the key A1111 / ComfyUI use
        pixels = torch.from_numpy(np.array(im)).permute(2, 0, 1).long()
    assert torch.equal(pixels, ((image + 1) * 127.5).round().to(torch.uint8).long())
    # overwritten in place, no temporary files left behind
    save_png(path, image, {"seed": 4})
    assert read_params(path) == {"seed": 4}
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.png"]
    save_png(tmp_path / "b.png", to_pil(image))
    assert read_params(tmp_path / "b.png") is None


def test_grid_layout():
    images = torch.stack([torch.full((1, 4, 4), -1.0 + 0.5 * i) for i in range(5)])
    grid = make_grid(images, nrow=3, padding=2)
    assert grid.mode == "L" and grid.size == (3 * 6 + 2, 2 * 6 + 2)
    # image i sits at row i // 3, column i % 3; padding stays black
    for i in range(5):
        left, top = 2 + (i % 3) * 6, 2 + (i // 3) * 6
        assert grid.getpixel((left + 1, top + 1)) == round((0.5 * i) * 127.5)
    assert grid.getpixel((0, 0)) == 0 and grid.getpixel((2 + 2 * 6 + 1, 2 + 6 + 1)) == 0  # empty slot
    assert make_grid(images[:2], nrow=8).size == (2 * 6 + 2, 6 + 2)
    with pytest.raises(ValueError, match="N, C, H, W"):
        make_grid(images[0], nrow=2)


def test_enlarge_turns_every_pixel_into_a_block():
    small = to_pil(torch.linspace(-1, 1, 2 * 3).reshape(1, 2, 3))
    big = enlarge(small, 4)
    assert big.mode == "L" and big.size == (12, 8)
    blocks = np.array(big).reshape(2, 4, 3, 4)     # (row, y in block, column, x in block)
    assert (blocks == np.array(small)[:, None, :, None]).all()
    assert enlarge(small, 1) is small
    with pytest.raises(ValueError, match="at least 1, found 0"):
        enlarge(small, 0)
