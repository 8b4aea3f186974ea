"""Reading and writing LoRA files: safetensors only (a pickle is never unpickled), the format
detected from the keys, every key mapped onto a layer of the network or reported.

``match_lora`` returns what matched and what did not; ``load_lora`` refuses a file with keys that
match nothing (a LoRA that silently changes nothing is the complaint every trainer's tracker
has), listing them. ``save_lora`` writes any format atomically, with metadata naming the format,
ranks and targets.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffcore.errors import ConfigError
from diffcore.lora import formats
from diffcore.lora.weights import LoraLayer, LoraWeights, fuse, part_sizes, split, stack

PICKLES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
SHOWN = 10


def read_lora(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a LoRA ``.safetensors`` file."""
    from safetensors import safe_open

    from diffcore.errors import DiffcoreError
    from diffcore.io.headers import check_safetensors

    path = Path(path)
    if path.suffix.lower() in PICKLES:
        raise ConfigError(f"{path}: LoRA files are read as safetensors only; a {path.suffix} file is a pickle, "
                          "which can run code when loaded and is never opened here. Convert it to .safetensors "
                          "where you trust it")
    if not path.is_file():
        raise ConfigError(f"{path}: no such LoRA file")
    try:
        check_safetensors(path)
    except DiffcoreError as exc:
        raise ConfigError(str(exc)) from None
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def linear_layers(network: nn.Module) -> dict[str, nn.Module]:
    """The network's linear layers by name; one that peft wrapped for training (its ``base_layer``)
    under the wrapper's name, so a training run's network names its layers as the plain one does."""
    out = {}
    for name, module in network.named_modules():
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            wrapped = child == "base_layer" and parent and hasattr(network.get_submodule(parent), "lora_A")
            out[parent if wrapped else name] = module
    return out


class _Names:
    """How a bundle's layers are called in each naming a file may use."""

    def __init__(self, bundle: Any):
        self.linears = linear_layers(bundle.network)
        rows = bundle.diffusers_modules(list(self.linears)) if hasattr(bundle, "diffusers_modules") else []
        if not rows:
            rows = [(n, n) for n in self.linears]
        self.parts: dict[str, list[str]] = {}
        for theirs, ours in rows:
            self.parts.setdefault(ours, []).append(theirs)
        self.diffusers = {theirs: (ours, i, len(self.parts[ours])) for ours, ds in self.parts.items()
                          for i, theirs in enumerate(ds)}
        self.ours_ = {n.replace(".", "_"): n for n in self.linears}
        self.diffusers_ = {d.replace(".", "_"): d for d in self.diffusers}

    def resolve(self, module: str, naming: str) -> tuple[str, int, int] | None:
        """(our module, part index, number of parts) or None."""
        if naming == "ours_":
            module, naming = self.ours_.get(module, ""), "ours"
        elif naming == "diffusers_":
            module, naming = self.diffusers_.get(module, ""), "diffusers"
        if naming == "ours":
            return (module, 0, 1) if module in self.linears else None
        return self.diffusers.get(module)

    def sizes(self, ours: str, parts: int) -> list[int]:
        layer = self.linears[ours]
        return part_sizes(layer.out_features, layer.in_features, parts)


def match_lora(tensors: Mapping[str, Tensor], bundle: Any, *, format: str | None = None,
               source: str = "the LoRA file") -> tuple[LoraWeights, list[str]]:
    """(what ``tensors`` apply to the bundle's network, the keys that match no layer)."""
    format = formats.canonical(format) if format else formats.detect(tensors)
    names = _Names(bundle)
    unmatched, skipped = [], []
    found: dict[tuple[str, int, int, str], dict[str, Tensor]] = {}
    sources: dict[tuple[str, int, int, str], list[str]] = {}
    for key, tensor in tensors.items():
        if formats.not_applicable(key):
            skipped.append(key)
            continue
        place = None
        for module, role, naming in formats.parse(key, format) or []:
            where = names.resolve(module, naming)
            if where is not None:
                place = (*where, module)
                break
        if place is None:
            unmatched.append(key)
            continue
        found.setdefault(place, {})[role] = tensor
        sources.setdefault(place, []).append(key)
    by_layer: dict[str, list[tuple[int, int, LoraLayer]]] = {}
    for place, roles in found.items():
        ours, index, parts, module = place
        if "down" not in roles or "up" not in roles:   # half a LoRA: its keys are reported, not applied
            missing = "up" if "down" in roles else "down"
            unmatched.extend(f"{key} (its {missing} matrix is missing)" for key in sources[place])
            continue
        down, up = roles["down"].float(), roles["up"].float()
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise ConfigError(f"{source}: the LoRA of {module} has down {tuple(down.shape)} and up {tuple(up.shape)}, "
                              "not (rank, in) and (out, rank) (a LyCORIS / conv LoRA is not supported)")
        linear = names.linears[ours]
        rows = names.sizes(ours, parts)[index]
        if down.shape[1] != linear.in_features or up.shape[0] != rows:
            raise ConfigError(f"{source}: the LoRA of {module} is for a ({up.shape[0]}, {down.shape[1]}) layer; "
                              f"this model's {ours} is ({rows}, {linear.in_features}) there: a LoRA for another "
                              "model or size")
        alpha = float(roles["alpha"]) if "alpha" in roles else float(down.shape[0])
        by_layer.setdefault(ours, []).append((index, parts, LoraLayer(down=down, up=up, alpha=alpha)))
    layers = {}
    for ours, items in by_layer.items():
        whole = [layer for _, parts, layer in items if parts == 1]
        pieces = [(i, layer) for i, parts, layer in items if parts > 1]
        if pieces:
            parts = max(p for _, p, _ in items)
            per_part: list[LoraLayer | None] = [None] * parts
            for i, layer in pieces:
                per_part[i] = layer if per_part[i] is None else stack([per_part[i], layer])
            whole.append(fuse(per_part, names.sizes(ours, parts)))
        layers[ours] = stack(whole)
    return LoraWeights(layers=layers, format=format, not_applicable=skipped), unmatched


def load_lora(path: str | Path, bundle: Any) -> LoraWeights:
    """The LoRA in ``path`` (any supported format) on the bundle's network's layers; keys that
    match no layer are a ``ConfigError`` listing them."""
    tensors, _ = read_lora(path)
    weights, unmatched = match_lora(tensors, bundle, source=str(path))
    if unmatched:
        more = len(unmatched) - SHOWN
        shown = ", ".join(unmatched[:SHOWN]) + (f", ... ({more} more)" if more > 0 else "")
        raise ConfigError(f"{path}: {len(unmatched)} of its {len(tensors)} keys match no layer of "
                          f"{type(bundle.network).__name__} (read as {weights.format} format): {shown}. "
                          "A misspelled key, a LoRA for another model, or a format diffcore does not read")
    if not weights:
        text = f" (only {len(weights.not_applicable)} text-encoder keys)" if weights.not_applicable else ""
        raise ConfigError(f"{path}: no LoRA for this model's network in it{text}")
    if weights.not_applicable:
        warnings.warn(f"{path}: {len(weights.not_applicable)} text-encoder keys (like {weights.not_applicable[0]}) "
                      "are not applied: diffcore applies LoRAs to the diffusion network only", stacklevel=2)
    return weights


def _tensors(weights: Mapping[str, LoraLayer], bundle: Any, format: str) -> dict[str, Tensor]:
    format = formats.canonical(format)
    out: dict[str, Tensor] = {}
    if format == "diffusers":
        names = _Names(bundle)
        prefix = getattr(bundle, "lora_prefix", "transformer")
        for ours, layer in weights.items():
            parts = names.parts.get(ours)
            if not parts:
                raise ConfigError(f"{ours} has no counterpart in diffusers' model: save this LoRA in another format")
            for theirs, piece in zip(parts, split(layer, names.sizes(ours, len(parts)))):
                if piece is None:
                    continue
                keys = formats.keys_for(format, theirs, prefix=prefix)
                out[keys["down"]] = piece.down.float()
                out[keys["up"]] = (piece.up.float() * piece.scale)   # alpha / r folded: diffusers' scale is 1
        return out
    for ours, layer in weights.items():
        try:
            keys = formats.keys_for(format, ours)
        except KeyError:
            raise ConfigError(f"the xlabs format holds double-block attention LoRAs only, not {ours}",
                              path="save_format") from None
        out[keys["down"]] = layer.down.float()
        if "alpha" in keys:
            out[keys["up"]] = layer.up.float()
            out[keys["alpha"]] = torch.tensor(float(layer.alpha))
        else:
            out[keys["up"]] = layer.up.float() * layer.scale
    return out


def save_lora(path: str | Path, weights: Mapping[str, LoraLayer], bundle: Any = None, *,
              format: str = "diffcore") -> Path:
    """``weights`` as a ``format`` LoRA file, written atomically (a temporary file, then renamed)."""
    from diffcore.io.checkpoint import save_file_atomic

    if formats.canonical(format) not in formats.FORMATS:
        raise ConfigError(f"unknown LoRA format {format!r}; known: {', '.join(formats.FORMATS)}", path="save_format")
    if formats.canonical(format) == "diffusers" and bundle is None:
        raise ConfigError("saving a LoRA in diffusers' format needs the model (its module names)")
    path = Path(path)
    tensors = {k: v.contiguous() for k, v in _tensors(weights, bundle, format).items()}
    ranks = sorted({layer.rank for layer in weights.values()})
    metadata = {"format": formats.canonical(format), "rank": ",".join(map(str, ranks)),
                "targets": json.dumps(sorted(weights)),
                "network": type(bundle.network).__name__ if bundle is not None else ""}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file_atomic(tensors, path, metadata=metadata)
    return path
