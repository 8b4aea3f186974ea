"""ControlNet pieces shared by the families (Zhang et al. 2023, arXiv:2302.05543).

``hint_encoder`` is the small conv stack that turns a pixel-space control image into features
at the latent's resolution (diffusers' ``ControlNetConditioningEmbedding``), in the original
checkpoints' layout: one ``nn.Sequential`` whose convs sit at even indices (lllyasviel's
``input_hint_block``, which XLabs' FLUX.1 ControlNets and SGM's ControlNets keep).
``hint_from_diffusers`` renames diffusers' ``conv_in`` / ``blocks.i`` / ``conv_out`` to those indices;
``trained_part`` reads a ControlNet out of a training checkpoint; ``canny`` makes edge maps.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn


def hint_encoder(widths: Sequence[int], out_channels: int, in_channels: int = 3) -> nn.Sequential:
    """conv + SiLU, then per step between ``widths`` a conv and a stride-2 conv (each + SiLU), then
    the output conv: ``len(widths) - 1`` halvings (8x for four widths)."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1), nn.SiLU()]
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Conv2d(a, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, b, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(nn.Conv2d(widths[-1], out_channels, 3, padding=1))
    return nn.Sequential(*layers)


def hint_from_diffusers(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """``{prefix}.conv_in`` -> ``{prefix}.0``, ``{prefix}.blocks.i`` -> ``{prefix}.{2 i + 2}``,
    ``{prefix}.conv_out`` -> the last conv's index; other keys pass unchanged (order kept)."""
    blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"{re.escape(prefix)}\.blocks\.(\d+)\.", k))}
    last = 2 * len(blocks) + 2

    def rename(key: str) -> str:
        if not key.startswith(prefix + "."):
            return key
        rest = key[len(prefix) + 1:]
        m = re.match(r"blocks\.(\d+)\.(.+)", rest)
        if m:
            return f"{prefix}.{2 * int(m.group(1)) + 2}.{m.group(2)}"
        for name, index in (("conv_in.", 0), ("conv_out.", last)):
            if rest.startswith(name):
                return f"{prefix}.{index}.{rest[len(name):]}"
        return key

    return {rename(k): v for k, v in sd.items()}


def hint_widths(shapes: dict[str, tuple[int, ...]], prefix: str) -> tuple[tuple[int, ...], int, int]:
    """(widths, out_channels, in_channels) of a ``hint_encoder`` from its tensor shapes (our layout)."""
    convs = sorted(int(m.group(1)) for k in shapes if (m := re.fullmatch(rf"{re.escape(prefix)}\.(\d+)\.weight", k)))
    if not convs:
        raise KeyError(f"{prefix}.0.weight")
    weights = [shapes[f"{prefix}.{i}.weight"] for i in convs]
    widths = (weights[0][0], *(w[0] for w in weights[2:-1:2]))
    return tuple(int(w) for w in widths), int(weights[-1][0]), int(weights[0][1])


def trained_part(sd: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of the core's ``controlnet`` trainer (``controlnet.*`` keys, maybe beside the
    frozen base's) -> the ControlNet's own keys; any other file's keys unchanged."""
    if not any(k.startswith("controlnet.") for k in sd):
        return sd
    return {k.removeprefix("controlnet."): v for k, v in sd.items() if k.startswith("controlnet.")}


def zero_(module: nn.Module) -> nn.Module:
    """Every parameter of ``module`` set to zero: a fresh ControlNet's output projections, so it
    starts as a no-op on the model it steers."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def canny(image: Tensor, low: float = 100, high: float = 200) -> Tensor:
    """OpenCV's ``cv2.Canny(image, low, high)`` (3x3 Sobel, L1 magnitude) on an 8-bit image, for
    the edge maps Canny ControlNets were trained on, without OpenCV. ``image``: (C, H, W) in
    [-1, 1] (as ``load_image`` gives; read back as bytes) or uint8. Returns a (H, W) bool map.

    As OpenCV: the Sobel sums use replicated borders and, for colour images, each pixel takes the
    channel with the largest magnitude (the first on ties); non-maximum suppression compares along
    the gradient's direction quantised with tan(22.5 deg) in 15-bit fixed point (strictly greater
    than the neighbour behind, at least the one ahead, strictly both on diagonals) against zero
    outside the image; hysteresis keeps the 8-connected chains above ``low`` that reach one above
    ``high``.
    """
    import torch
    import torch.nn.functional as F

    if image.dtype != torch.uint8:
        image = ((image.float() + 1) * 127.5).round().clamp(0, 255)
    x = image.to(torch.float64)[:, None]                         # (C, 1, H, W): exact integer sums
    low, high = int(low // 1), int(high // 1)
    low, high = min(low, high), max(low, high)
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    sobel = torch.tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=torch.float64)
    dx = F.conv2d(padded, sobel[None, None])[:, 0].long()
    dy = F.conv2d(padded, sobel.T[None, None])[:, 0].long()
    mags = dx.abs() + dy.abs()
    best = mags.argmax(dim=0, keepdim=True)                     # first channel on ties, as OpenCV
    dx, dy, mag = (t.gather(0, best)[0] for t in (dx, dy, mags))

    m = F.pad(mag, (1, 1, 1, 1))                                 # zeros around: no edge beyond the image
    h, w = mag.shape

    def at(dr: int, dc: int) -> Tensor:
        return m[1 + dr:1 + dr + h, 1 + dc:1 + dc + w]

    xs, ys = dx.abs(), dy.abs()
    tg22 = xs * 13573                                            # round(tan(22.5 deg) * 2^15)
    ys15 = ys << 15
    horizontal = ys15 < tg22
    vertical = ~horizontal & (ys15 > tg22 + (xs << 16))
    s = torch.where((dx ^ dy) < 0, -1, 1)
    diag_a = torch.where(s < 0, at(-1, 1), at(-1, -1))           # the row above, at column - s
    diag_b = torch.where(s < 0, at(1, -1), at(1, 1))             # the row below, at column + s
    peak = torch.where(horizontal, (mag > at(0, -1)) & (mag >= at(0, 1)),
                       torch.where(vertical, (mag > at(-1, 0)) & (mag >= at(1, 0)),
                                   (mag > diag_a) & (mag > diag_b)))
    candidate = peak & (mag > low)
    edges = candidate & (mag > high)
    kernel = torch.ones(1, 1, 3, 3, dtype=torch.float32)
    while True:
        grown = candidate & (F.conv2d(edges[None, None].float(), kernel, padding=1)[0, 0] > 0)
        if torch.equal(grown, edges):
            return edges
        edges = grown


def controlnet_source(path: Path, class_name: str, what: str) -> tuple[Path, dict | None]:
    """(the file, or the folder holding the weights; its ``config.json`` or None) of a ControlNet
    at ``path``: a single file, a component folder, or a pipeline folder with ``controlnet/``. A
    missing path, or a config of another class than diffusers' ``class_name``, is one line naming
    ``what`` the family expects."""
    from diffcore.errors import CheckpointError
    from diffcore.io.headers import read_config_json

    if path.is_file():
        return path, None
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such ControlNet file or folder")
    if (path / "controlnet").is_dir():
        path = path / "controlnet"
    config = read_config_json(path / "config.json") if (path / "config.json").is_file() else None
    if config is not None and config.get("_class_name", class_name) != class_name:
        raise CheckpointError(f"{path}: config.json describes a {config['_class_name']}, not {what}")
    return path, config
