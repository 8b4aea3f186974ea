"""Fingerprints of model files and modules: what latent and text-embedding caches key their
entries by, so a changed autoencoder or text encoder invalidates exactly the entries it made.

Reading kilobytes, not gigabytes: keying a cache must cost no load.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:   # torch-free on import: plugins fingerprint files while registering, before torch loads
    from torch import nn

__all__ = ["fingerprint", "module_fingerprint"]


def fingerprint(paths: list[Path], *extra: object) -> str:
    """A hash that changes when a file under ``paths`` (or ``extra``) changes, reading kilobytes
    rather than the weights (so keying a cache costs no load): relative names and sizes; for a
    safetensors file its header and the first and last 256 bytes of every tensor (a retrained
    tensor differs there, and small ones such as the autoencoder's BatchNorm statistics are read
    whole); other files whole up to 16 MiB, else 4 KiB from the middle and the end."""
    h = hashlib.sha256(repr(extra).encode())
    for root in paths:
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            size = f.stat().st_size
            h.update(f"{f.relative_to(root) if root.is_dir() else f.name}:{size}".encode())
            with open(f, "rb") as fh:
                for chunk in _samples(fh, size, f.suffix == ".safetensors"):
                    h.update(chunk)
    return h.hexdigest()[:16]


def _samples(fh: BinaryIO, size: int, safetensors: bool) -> Iterator[bytes]:
    if safetensors and size >= 8:
        n = int.from_bytes(fh.read(8), "little")
        if 0 < n <= size - 8:
            header = fh.read(n)
            yield header
            try:
                entries = json.loads(header)
            except ValueError:
                entries = {}
            for entry in entries.values():
                if isinstance(entry, dict) and "data_offsets" in entry:
                    start, end = (8 + n + int(o) for o in entry["data_offsets"])
                    for at, length in ((start, min(256, end - start)), (max(end - 256, start), min(256, end - start))):
                        fh.seek(at)
                        yield fh.read(length)
            return
    if size <= 16 << 20:
        fh.seek(0)
        yield fh.read()
        return
    for at in (size // 2, size - 4096):
        fh.seek(at)
        yield fh.read(4096)


def module_fingerprint(module: nn.Module, *extra: object) -> str:
    """For a component built in memory (no files): names, shapes, dtypes and a few values of every tensor."""
    h = hashlib.sha256(repr(extra).encode())
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(flat[:: max(flat.numel() // 16, 1)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
