"""PNG output: grids and files that carry their generation parameters.

Parameters go into a ``tEXt`` chunk named ``parameters`` holding JSON, the key A1111 and
ComfyUI use for theirs, so a PNG dropped into another tool (or ``read_params``) says how it was
made. Writes are atomic: a temporary file in the same folder, then ``os.replace``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

PARAMS_KEY = "parameters"


def to_pil(image: torch.Tensor | Image.Image) -> Image.Image:
    """A (C, H, W) tensor in [-1, 1] (C = 1 or 3) as an 8-bit PIL image; a PIL image unchanged."""
    if isinstance(image, Image.Image):
        return image
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected a (C, H, W) image tensor with C = 1 or 3, found shape {tuple(image.shape)}")
    pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = pixels.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0], mode="L") if array.shape[2] == 1 else Image.fromarray(array, mode="RGB")


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2) -> Image.Image:
    """Tile (N, C, H, W) images in [-1, 1] into rows of ``nrow``, ``padding`` black pixels apart."""
    if images.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) images, found shape {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, found {nrow}")
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    canvas = torch.full((c, rows * (h + padding) + padding, ncol * (w + padding) + padding), -1.0)
    for i, image in enumerate(images.detach().float().cpu()):
        top = padding + (i // ncol) * (h + padding)
        left = padding + (i % ncol) * (w + padding)
        canvas[:, top:top + h, left:left + w] = image
    return to_pil(canvas)


def enlarge(image: Image.Image, factor: int) -> Image.Image:
    """``image`` with every pixel a ``factor`` x ``factor`` block (nearest neighbour): tiny samples
    (8x8 digits) become visible without smoothing away what the model drew."""
    if factor < 1:
        raise ValueError(f"the enlargement factor must be at least 1, found {factor}")
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def save_png(path: str | Path, image: torch.Tensor | Image.Image, params: dict[str, Any] | None = None) -> Path:
    """Write ``image`` as PNG with ``params`` as JSON in the ``parameters`` text chunk, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if params is not None:
        info.add_text(PARAMS_KEY, json.dumps(params, sort_keys=True, default=str))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            to_pil(image).save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_params(path: str | Path) -> dict[str, Any] | None:
    """The parameters ``save_png`` embedded in ``path``, or None when it has none."""
    with Image.open(path) as im:
        text = im.text.get(PARAMS_KEY) if hasattr(im, "text") else None
    return None if text is None else json.loads(text)


def load_image(path: str | Path, *, size: tuple[int, int] | None = None, channels: int = 3) -> torch.Tensor:
    """An image file as a (C, H, W) tensor in [-1, 1]; ``size`` = (height, width) resizes (Lanczos).
    A missing or unreadable file is a ConfigError naming it."""
    from diffcore.errors import ConfigError

    try:
        image = Image.open(path)
        image.load()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read image {str(path)!r}: {exc}") from None
    image = image.convert("L" if channels == 1 else "RGB")
    if size is not None and (image.height, image.width) != tuple(size):
        image = image.resize((size[1], size[0]), Image.LANCZOS)
    array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, -1)
    return array.permute(2, 0, 1).float() / 127.5 - 1
