"""A safetensors file's header, checked before safetensors opens the file.

safetensors reports a damaged file in its parser's terms ("header too small", "incomplete
metadata, file not fully covered", "invalid shape, data type, or offset for tensor"); these
checks say what is wrong and with which tensor: an empty file, a truncated download, a header
that is not JSON, offsets that do not fit the file, the dtype or the shape. The dtype's name
itself is left to safetensors (its list grows), its error reworded by ``plain_safetensors_error``.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Union

from diffcore.errors import CheckpointError

PathLike = Union[str, "os.PathLike[str]"]


MAX_HEADER = 100_000_000  # bytes: safetensors' own limit on the JSON header


def check_safetensors(file: PathLike) -> dict:
    """The header of a ``.safetensors`` file, after checking what ``safe_open`` reports in its own
    terms: that the file is not empty, its header is a JSON object of tensor entries, and the
    file holds every byte the header promises (an interrupted download is the usual culprit)."""
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else None
            text = f.read(length) if length is not None and 8 + length <= size and length <= MAX_HEADER else b""
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot be read: {exc.strerror or exc}") from None
    if size == 0:
        raise CheckpointError(f"{file}: empty file (0 bytes): an interrupted download or a placeholder, "
                              f"not safetensors weights")
    if length is None or length > MAX_HEADER:
        raise CheckpointError(f"{file}: not a safetensors file: its first 8 bytes are no header length "
                              f"({size:,} bytes in all; another format, or damaged)")
    if 8 + length > size:
        raise CheckpointError(f"{file}: truncated: {size:,} bytes, but its header alone is {length:,} "
                              f"(incomplete download? fetch it again)")
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a safetensors file: its header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors file: its header is a JSON {type(header).__name__}, "
                              f"expected an object of tensor names")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{file}: not a safetensors file: tensor {name!r} has no \"data_offsets\" "
                                  f"[begin, end] in its header entry {entry!r:.120}")
        end = max(end, offsets[1])
    if 8 + length + end > size:
        raise CheckpointError(f"{file}: truncated: {size:,} bytes of the {8 + length + end:,} its header "
                              f"describes (incomplete download? fetch it again)")
    for name, entry in header.items():
        if name != "__metadata__":
            _check_span(file, name, entry, entry["data_offsets"])
    return header


# bytes per element of the byte-aligned safetensors dtypes (the sub-byte F4 / F6 are left to safetensors)
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1,
             "F8_E5M2FNUZ": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "C64": 8,
             "F64": 8, "I64": 8, "U64": 8}


def _check_span(file: Path, name: str, entry: dict, offsets: list[int]) -> None:
    """A tensor's bytes must be exactly what its dtype and shape need (safetensors says only
    "invalid shape, data type, or offset", without the tensor)."""
    dtype, shape = entry.get("dtype"), entry.get("shape")
    size = _ITEMSIZE.get(dtype) if isinstance(dtype, str) else None
    if size is None or not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        return
    need = size * math.prod(shape)
    if offsets[0] < 0 or offsets[1] - offsets[0] != need:
        raise CheckpointError(f"{file}: not a safetensors file: tensor {name!r} ({dtype}, shape {shape}) "
                              f"needs {need:,} bytes, but its data_offsets {offsets} span {offsets[1] - offsets[0]:,}")


_UNKNOWN_DTYPE = re.compile(r"unknown variant `([^`]*)`, expected one of (.*?) at line")


def plain_safetensors_error(message: str, header: dict) -> str:
    """safetensors' parser message, with an unknown dtype named by its tensor."""
    m = _UNKNOWN_DTYPE.search(message)
    if not m:
        return message
    names = [k for k, v in header.items() if isinstance(v, dict) and v.get("dtype") == m[1]]
    where = f"tensor {names[0]!r}" if names else "a tensor"
    return f"{where} has dtype {m[1]!r}, which is not a safetensors dtype (expected one of {m[2].replace('`', '')})"


def read_config_json(file: Path) -> dict:
    """A model folder's JSON file (``config.json``, ``model_index.json``) as a dict; anything
    unreadable or not an object is a ``CheckpointError`` naming the file."""
    try:
        data = json.loads(Path(file).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data
