"""Checking weight files before reading them: an interrupted download or a file of another
format is one clear line, not a failure deep inside a loader."""

from __future__ import annotations

import json

from diffcore.errors import CheckpointError
from diffcore.io.checkpoint import PathLike, checkpoint_files

__all__ = ["check_safetensors"]

MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def check_safetensors(path: PathLike) -> None:
    """Every ``.safetensors`` file behind ``path`` is whole: its header parses and the file holds
    all the bytes the header promises (an interrupted download is the usual culprit)."""
    for file in checkpoint_files(path):
        if file.suffix != ".safetensors":
            continue
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 0 or length > MAX_HEADER:
                raise CheckpointError(f"{file}: not a safetensors file ({size} bytes, no valid header length); "
                                      f"an incomplete download or another format")
            if 8 + length > size:
                raise CheckpointError(f"{file}: truncated: {size:,} bytes, but its header alone is {length:,} "
                                      f"(incomplete download? fetch it again)")
            try:
                header = json.loads(f.read(length))
                end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
                raise CheckpointError(f"{file}: not a safetensors file: its header does not parse ({exc})") from None
        if 8 + length + end > size:
            raise CheckpointError(f"{file}: truncated: {size:,} bytes of the {8 + length + end:,} its header "
                                  f"describes (incomplete download? fetch it again)")
