"""SD3 training helpers: LoRA target presets, diffusers module names, and the fingerprints a
latent / text cache keys its entries by.

Presets (``fnmatch`` patterns over ``MMDiT.named_modules()``; ``attn*`` takes in SD3.5-medium's
second image attention ``attn2`` where a block has one):

- ``attention``: both streams' fused ``qkv`` and output ``proj``: diffusers'
  train_dreambooth_lora_sd3 default (``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0`` and the
  context stream's ``add_*_proj`` / ``to_add_out``), plus ``attn2``'s.
- ``attention-mlp``: the above and both streams' MLPs (``ff`` / ``ff_context``).
- ``all-linear``: every linear layer: the adaLN modulations, embedders and final layer too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import BinaryIO

from torch import nn

from diffcore_sd3.convert import diffusers_modules

ATTENTION = ["joint_blocks.*.*_block.attn*.qkv", "joint_blocks.*.*_block.attn*.proj"]
LORA_PRESETS = {
    "attention": ATTENTION,
    "attention-mlp": [*ATTENTION, "joint_blocks.*.*_block.mlp.fc*"],
    "all-linear": ["*"],
}


def lora_patterns(network: nn.Module, pattern: str) -> list[str]:
    """Patterns over ``network``'s module names for a user's ``pattern``: in our naming as it is or
    (peft's rule) as the last dotted parts of a name; in diffusers' naming (a leading
    ``transformer.`` allowed), our layers whose diffusers name it matches the same two ways
    (``to_q`` -> every ``x_block.attn.qkv`` and ``attn2.qkv``; ``add_k_proj`` -> ``context_block.attn.qkv``)."""
    linears = [n for n, m in network.named_modules() if isinstance(m, nn.Linear)]
    bare = pattern.removeprefix("transformer.")
    matches = [pattern, f"*.{pattern}", bare, f"*.{bare}"]
    found = {ours: None for theirs, ours in diffusers_modules(linears) if any(fnmatchcase(theirs, p) for p in matches)}
    return [*dict.fromkeys(matches), *found]


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
