"""What ``diffcore lora inspect`` prints about a LoRA file: its format, ranks, alphas and targets
(grouped, block numbers as N), and with a model, the keys that match none of its layers."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from diffcore.lora import formats
from diffcore.lora.files import read_lora


def describe_lora(path: str | Path, bundle: Any = None) -> list[str]:
    tensors, metadata = read_lora(path)
    format = formats.detect(tensors)
    modules: dict[str, dict[str, Any]] = {}
    other, text = [], []
    for key, t in tensors.items():
        if formats.not_applicable(key):
            text.append(key)
            continue
        readings = formats.parse(key, format)
        if not readings:
            other.append(key)
            continue
        module, role, _ = readings[0]
        modules.setdefault(module, {})[role] = t
    ranks = Counter(int(m["down"].shape[0]) for m in modules.values() if "down" in m)
    alphas = Counter(float(m["alpha"]) for m in modules.values() if "alpha" in m)
    lines = [f"file: {path}", f"format: {format}" + (f" (metadata says {metadata['format']})"
                                                      if metadata.get("format") not in (None, format) else ""),
             f"rank: {', '.join(f'{r} ({n} layers)' for r, n in sorted(ranks.items())) or 'none'}",
             "alpha: " + (', '.join(f'{a:g} ({n} layers)' for a, n in sorted(alphas.items()))
                          or "none stored (scale 1: alpha = rank)"),
             f"targets: {len(modules)}"]
    groups = Counter(re.sub(r"(?<=[._])\d+(?=[._])", "N", m) for m in modules)
    lines += [f"  {g}" + (f"  x{n}" if n > 1 else "") for g, n in sorted(groups.items())]
    lines += _text_lines(text)
    if other:
        lines.append(f"keys of no LoRA tensor this format has: {len(other)}: {', '.join(other[:10])}")
    if bundle is not None:
        from diffcore.lora.files import match_lora

        weights, unmatched = match_lora(tensors, bundle, source=str(path))
        lines.append(f"on {type(bundle.network).__name__}: {len(weights)} layers of ours")
        for prefix, layers in weights.text_encoders.items():
            lines.append(f"on {prefix}: {len(layers)} layers")
        if weights.not_applicable:
            lines.append(f"text-encoder keys this model does not take: {len(weights.not_applicable)}")
        lines.append(f"unmatched keys: {len(unmatched)}" + (": " + ", ".join(unmatched[:10]) if unmatched else ""))
    return lines


def _text_lines(keys: list[str]) -> list[str]:
    """Per text encoder (file prefix): its targets, grouped as the network's, with rank and alpha."""
    modules: dict[str, dict[str, dict[str, Any]]] = {}
    for key in keys:
        parsed = formats.parse_text(key)
        if parsed is not None:
            prefix, module, role, _ = parsed
            modules.setdefault(prefix, {}).setdefault(module, {})[role] = key
    lines = []
    for prefix, found in sorted(modules.items()):
        groups = Counter(re.sub(r"(?<=[._])\d+(?=[._])", "N", m) for m in found)
        lines.append(f"text-encoder targets: {prefix}: {len(found)}")
        lines += [f"  {g}" + (f"  x{n}" if n > 1 else "") for g, n in sorted(groups.items())]
    other = len(keys) - sum(len(r) for found in modules.values() for r in found.values())
    if other:
        lines.append(f"text-encoder keys of no LoRA tensor: {other}")
    return lines
