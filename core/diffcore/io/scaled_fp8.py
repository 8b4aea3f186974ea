"""Scaled fp8 checkpoints, as ComfyUI writes them: each quantised layer's ``weight`` in fp8 with a
float32 ``weight_scale`` beside it (one per tensor, or one per output row), the value being
``weight * weight_scale``. Two generations of side keys are read:

- ``<layer>.weight_scale``, ``<layer>.input_scale`` and ``<layer>.comfy_quant`` (a JSON
  ``{"format": "float8_e4m3fn"}`` stored as uint8 bytes): ComfyUI's mixed-precision files, such
  as Comfy-Org's ``flux2_dev_fp8mixed.safetensors``; the layers without them are bf16.
- ``<layer>.scale_weight``, ``<layer>.scale_input`` and a ``scaled_fp8`` marker key: the earlier
  "fp8 scaled" files (``sd3.5_large_fp8_scaled.safetensors``).

The input scales serve ComfyUI's fp8 matmuls and are not needed to compute the weights, so they
are dropped (``fp8_matmul`` measures its own per token). Formats other than fp8 (nvfp4) are
refused by name.
"""

from __future__ import annotations

import json
from collections.abc import MutableMapping

import torch

from diffcore.errors import CheckpointError

__all__ = ["dequantize", "is_side_key", "pop_scales"]

SCALES = (".weight_scale", ".scale_weight")
DROPPED = (".input_scale", ".scale_input", ".comfy_quant")
MARKER = "scaled_fp8"
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_side_key(key: str) -> bool:
    """Whether ``key`` is a scale, a quantisation note or the marker, not a weight of the model."""
    return key.endswith(SCALES + DROPPED) or key == MARKER or key.endswith("." + MARKER)


def pop_scales(state: MutableMapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Take the side keys out of ``state``; returns each scaled weight's key -> its scale."""
    for key in [k for k in state if k.endswith(".comfy_quant")]:
        note = state[key]
        try:
            found = json.loads(bytes(note.to(torch.uint8).tolist()).decode()).get("format")
        except (ValueError, UnicodeDecodeError, AttributeError):
            found = None
        if found not in ("float8_e4m3fn", "float8_e5m2"):
            raise CheckpointError(f"{where}: {key} says the layer is stored as {found!r}; diffcore reads ComfyUI's "
                                  f"fp8 formats (float8_e4m3fn, float8_e5m2) only: use an fp8 or bf16 file")
    scales = {}
    for key in [k for k in state if is_side_key(k)]:
        tensor = state.pop(key)
        suffix = next((s for s in SCALES if key.endswith(s)), None)
        if suffix is None:
            continue
        weight_key = key[: -len(suffix)] + ".weight"
        weight = state.get(weight_key)
        if weight is None or weight.dtype not in FP8:
            found = "absent" if weight is None else f"{str(weight.dtype).removeprefix('torch.')}"
            raise CheckpointError(f"{where}: {key} scales {weight_key}, which is {found}, not an fp8 tensor")
        rows = weight.shape[0] if weight.ndim else 1
        if tensor.numel() not in (1, rows):
            raise CheckpointError(f"{where}: {key} has {tensor.numel()} values for the {rows} rows of {weight_key}: "
                                  f"expected one scale, or one per row")
        scales[weight_key] = tensor
    return scales


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight * scale`` in float32, then in ``dtype``."""
    scale = scale.to(weight.device, torch.float32)
    scale = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, *[1] * (weight.ndim - 1))
    return (weight.to(torch.float32) * scale).to(dtype)
