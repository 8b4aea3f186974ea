"""Pixel inputs for editing and inpainting, prepared the way the references prepare theirs.

- References (BFL flux2 ``sampling.encode_image_refs`` / ``default_prep``): at least 64 pixels a
  side and an aspect ratio of at most 8; scaled down (Lanczos) to at most 2024^2 pixels when
  there is one reference and 1024^2 each when there are several; then centre-cropped to
  multiples of 16. diffusers' ``Flux2KleinPipeline`` caps every reference at 1024^2.
- The image to repaint (diffusers ``Flux2KleinInpaintPipeline``): at most 1024^2 pixels, then
  resized to sides floored to multiples of 16. Its mask is binarised at 0.5 at the image's size
  and bilinearly resampled to the token grid, so tokens on an edge get a fractional value.

Images are (C, H, W) tensors in [-1, 1], masks (1, H, W) in [0, 1] with 1 = repaint, as the
generate job hands them over. Resizing goes through an 8-bit PIL image, as both references
resize PIL images; an image that needs no resizing is never quantised.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from diffcore.api import ConfigError, to_pil

MIN_SIDE, MAX_ASPECT = 64, 8
ONE_REFERENCE_PIXELS = 2024**2
SEVERAL_REFERENCES_PIXELS = 1024**2
INPAINT_PIXELS = 1024**2


def reference_cap(count: int) -> int:
    """BFL's pixel budget per reference image when ``count`` of them condition one generation."""
    return ONE_REFERENCE_PIXELS if count == 1 else SEVERAL_REFERENCES_PIXELS


def capped_size(height: int, width: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) scaled to at most ``max_pixels``, aspect kept, sides truncated (BFL ``cap_pixels``)."""
    if height * width <= max_pixels:
        return height, width
    scale = math.sqrt(max_pixels / (height * width))
    return int(height * scale), int(width * scale)


def reference_size(height: int, width: int, max_pixels: int, multiple: int) -> tuple[int, int]:
    """The size ``prepare_reference`` gives an image of ``height`` x ``width``."""
    h, w = capped_size(height, width, max_pixels)
    return h // multiple * multiple, w // multiple * multiple


def inpaint_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """The output size diffusers' inpainting derives from the image to repaint."""
    h, w = capped_size(height, width, INPAINT_PIXELS)
    return h // multiple * multiple, w // multiple * multiple


def resize(image: Tensor, height: int, width: int) -> Tensor:
    """(C, H, W) in [-1, 1] -> (C, height, width), Lanczos; the same tensor when the size matches."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    pil = to_pil(image).resize((width, height), Image.LANCZOS)
    pixels = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8).reshape(height, width, -1)
    return pixels.permute(2, 0, 1).float().to(image.device) / 127.5 - 1


def prepare_reference(image: Tensor, max_pixels: int, multiple: int, index: int = 0) -> Tensor:
    """A reference image checked, capped at ``max_pixels`` and centre-cropped to multiples of ``multiple``."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ConfigError(f"reference image {index} has shape {tuple(image.shape)}; expected (3, H, W) in [-1, 1]",
                          path="job.reference_image")
    height, width = image.shape[-2:]
    if min(height, width) < MIN_SIDE or max(height, width) > MAX_ASPECT * min(height, width):
        raise ConfigError(f"reference image {index} is {width}x{height}; FLUX.2 takes references of at least "
                          f"{MIN_SIDE} pixels a side with an aspect ratio of at most {MAX_ASPECT}:1",
                          path="job.reference_image")
    image = resize(image, *capped_size(height, width, max_pixels))
    h, w = image.shape[-2:]
    top, left = (h - h // multiple * multiple) // 2, (w - w // multiple * multiple) // 2
    return image[:, top:top + h // multiple * multiple, left:left + w // multiple * multiple]


def token_mask(mask: Tensor, height: int, width: int, tokens_h: int, tokens_w: int) -> Tensor:
    """(1, H, W) mask in [0, 1] -> (1, 1, tokens_h, tokens_w): resized to the image (Lanczos),
    binarised at 0.5, then bilinearly resampled to the token grid (diffusers ``prepare_mask_latents``)."""
    if mask.ndim != 3 or mask.shape[0] != 1:
        raise ConfigError(f"the inpainting mask has shape {tuple(mask.shape)}; expected (1, H, W) in [0, 1]",
                          path="job.mask")
    if tuple(mask.shape[-2:]) != (height, width):
        mask = (resize(mask * 2 - 1, height, width) + 1) / 2
    binary = (mask >= 0.5).float()
    return F.interpolate(binary[None], size=(tokens_h, tokens_w), mode="bilinear")
