"""ControlNet toolbox pieces: the Canny edge map (against OpenCV when it is installed), the hint
encoder's shapes and key renaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from diffcore.nn.control import canny, hint_encoder, hint_from_diffusers, hint_widths


def test_canny_finds_a_squares_outline():
    """A white square on black: edges on its boundary, one pixel thick, nothing elsewhere."""
    image = torch.full((3, 32, 32), -1.0)
    image[:, 8:24, 8:24] = 1.0
    edges = canny(image)
    rows, cols = torch.nonzero(edges, as_tuple=True)
    assert edges.sum() > 50
    on_outline = ((rows == 7) | (rows == 8) | (rows == 23) | (rows == 24) | (cols == 7) | (cols == 8) |
                  (cols == 23) | (cols == 24))
    assert bool(on_outline.all())
    assert not edges[12:20, 12:20].any() and not edges[:4].any()
    assert not canny(torch.zeros(3, 16, 16)).any()          # a flat image has no edges
    assert torch.equal(canny(image, 200, 100), edges)         # thresholds in either order, as OpenCV


def photo(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 6, 40, 30), outline=(255, 0, 0), width=2)
    draw.rectangle((24, 14, 50, 36), fill=(0, 0, 200))
    return np.array(image)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("low, high", [(100, 200), (20, 60), (55.7, 180.2)])
def test_canny_is_opencvs(seed, low, high):
    cv2 = pytest.importorskip("cv2")
    image = photo(seed)
    for array in (image, np.ascontiguousarray(image[..., 1]), np.random.default_rng(seed).integers(
            0, 256, (23, 31, 3), dtype=np.uint8)):   # colour (max-magnitude channel), grey, pure noise
        tensor = torch.from_numpy(array).permute(2, 0, 1) if array.ndim == 3 else torch.from_numpy(array)[None]
        assert np.array_equal(canny(tensor, low, high).numpy(), cv2.Canny(array, low, high) > 0)


def test_canny_reads_images_in_minus_one_one_as_bytes():
    image = photo(0)
    as_loaded = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1   # what load_image gives
    assert torch.equal(canny(as_loaded), canny(torch.from_numpy(image).permute(2, 0, 1)))


def test_hint_encoder_shapes_and_diffusers_keys():
    """Four widths: 8x down to ``out_channels``; diffusers' conv_in / blocks.i / conv_out names map
    to the Sequential's conv indices, and the sizes read back from the shapes."""
    hint = hint_encoder((16, 32, 96, 256), 320)
    assert hint(torch.zeros(1, 3, 64, 48)).shape == (1, 320, 8, 6)
    ours = {k: tuple(v.shape) for k, v in hint.state_dict().items()}
    diffusers = {"h.conv_in.weight": ours["0.weight"], **{f"h.blocks.{i}.weight": ours[f"{2 * i + 2}.weight"]
                                                           for i in range(6)}, "h.conv_out.weight": ours["14.weight"]}
    renamed = hint_from_diffusers(diffusers, "h")
    assert renamed == {f"h.{k}": v for k, v in ours.items() if k.endswith("weight")}
    assert hint_widths(renamed, "h") == ((16, 32, 96, 256), 320, 3)
