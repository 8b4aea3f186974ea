"""Small helpers every family's key converters are made of: telling a checkpoint's layout from
its keys, renaming keys by rules, taking the part of an all-in-one file under a prefix, and the
shape-only state dicts that let converters run on tensor headers alone.

Converters consume their input (pop as they go) so each tensor exists once in memory.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from diffcore.errors import CheckpointError

__all__ = ["block_indices", "detect_layout", "meta_state", "rename_keys", "strip_prefix", "swap_halves"]

Rule = tuple[str, "str | Callable[[re.Match[str]], str]"]


def swap_halves(t: Tensor) -> Tensor:
    """[a | b] -> [b | a] along dim 0: an adaLN stored (shift, scale) by BFL and SD3, (scale,
    shift) by diffusers' ``AdaLayerNormContinuous``."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def meta_state(shapes: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
    """Shapes (``diffcore.io.checkpoint.tensor_shapes``) as meta tensors, so converters run on a
    file's header without reading its weights."""
    return {k: torch.empty(tuple(s), device="meta") for k, s in shapes.items()}


def detect_layout(keys: Iterable[str], layouts: Mapping[str, Sequence[str]], what: str) -> str:
    """The first of ``layouts`` (name -> marker keys) with a marker among ``keys``; a marker ending
    in "." is a prefix. Order matters: list the most specific layout first (ComfyUI's prefix
    before the bare keys it prefixes). None found: a ``CheckpointError`` saying "not {what}"."""
    keys = list(keys)
    present = set(keys)
    for layout, markers in layouts.items():
        for marker in markers:
            if marker in present or (marker.endswith(".") and any(k.startswith(marker) for k in keys)):
                return layout
    expected = "; ".join(f"{', '.join(m + '*' if m.endswith('.') else m for m in markers)} ({layout})"
                         for layout, markers in layouts.items())
    raise CheckpointError(f"not {what}: none of its {len(keys)} keys marks a known layout ({expected}); "
                          f"first keys: {', '.join(sorted(keys)[:5])}")


def rename_keys(sd: dict[str, Tensor], rules: Sequence[Rule]) -> dict[str, Tensor]:
    """Every key through every ``re.sub(pattern, replacement)`` rule in order; consumes ``sd``."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]
    out = {}
    for key in list(sd):
        new = key
        for pattern, repl in compiled:
            new = pattern.sub(repl, new)
        out[new] = sd.pop(key)
    return out


def strip_prefix(sd: dict[str, Tensor], prefixes: Sequence[str]) -> dict[str, Tensor]:
    """The keys under the first of ``prefixes`` that occurs, without it (an all-in-one file's one
    component; the other components are left out); ``sd`` itself when none occurs."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in sd):
            out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            sd.clear()
            return out
    return sd


def block_indices(keys: Iterable[str], prefix: str) -> list[int]:
    """Sorted ``N`` of the keys ``{prefix}.N.*`` (the blocks a checkpoint holds)."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})
