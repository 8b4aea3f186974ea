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
from diffcore.nn.fp8 import Float8Linear

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
    """The network's linear layers by name (fp8-stored ones too); one that peft wrapped for training
    (its ``base_layer``) under the wrapper's name, so a training run's network names its layers as
    the plain one does."""
    out = {}
    for name, module in network.named_modules():
        if isinstance(module, (nn.Linear, Float8Linear)):
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


def _text_encoders(bundle: Any, keys: list[str]) -> dict[str, nn.Module]:
    """The bundle's text encoders by prefix, asked for only when the file has text-encoder keys
    (reading them may load the encoders)."""
    if not keys or not hasattr(bundle, "text_encoders"):
        return {}
    return bundle.text_encoders()


def text_file_names(encoder: nn.Module) -> dict[str, str]:
    """Module name in LoRA files -> the encoder's own, for each of its linear layers. transformers 5
    dropped ``CLIPTextModel``'s ``text_model`` level, which the files people trade, diffusers and
    ``CLIPTextModelWithProjection`` keep (``text_model.encoder.layers.0.self_attn.q_proj``)."""
    flat = type(encoder).__name__.startswith("CLIPText") and not hasattr(encoder, "text_model")
    return {(f"text_model.{n}" if flat else n): n for n in linear_layers(encoder)}


def match_text(tensors: Mapping[str, Tensor], encoders: Mapping[str, nn.Module], *,
               source: str = "the LoRA file") -> tuple[dict[str, dict[str, LoraLayer]], list[str], list[str]]:
    """(prefix -> module -> LoRA, keys for encoders not in ``encoders``, keys that match no linear
    layer of an encoder that is) for a file's text-encoder keys."""
    skipped, unmatched = [], []
    found: dict[tuple[str, str], dict[str, Tensor]] = {}
    sources: dict[tuple[str, str], list[str]] = {}
    linears = {prefix: linear_layers(encoder) for prefix, encoder in encoders.items()}
    dotted = {prefix: {**{n: n for n in linears[prefix]}, **text_file_names(encoder)}
              for prefix, encoder in encoders.items()}   # the file's name, or the encoder's own
    underscored = {prefix: {n.replace(".", "_"): ours for n, ours in names.items()} for prefix, names in dotted.items()}
    for key, tensor in tensors.items():
        parsed = formats.parse_text(key)
        if parsed is None or parsed[0] not in encoders:
            skipped.append(key)
            continue
        prefix, module, role, naming = parsed
        module = (underscored if naming == "ours_" else dotted)[prefix].get(module, "")
        if module not in linears[prefix]:
            unmatched.append(key)
            continue
        found.setdefault((prefix, module), {})[role] = tensor
        sources.setdefault((prefix, module), []).append(key)
    out: dict[str, dict[str, LoraLayer]] = {}
    for (prefix, module), roles in found.items():
        if "down" not in roles or "up" not in roles:
            missing = "up" if "down" in roles else "down"
            unmatched.extend(f"{key} (its {missing} matrix is missing)" for key in sources[prefix, module])
            continue
        down, up = roles["down"].float(), roles["up"].float()
        linear = linears[prefix][module]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1] or \
                (up.shape[0], down.shape[1]) != (linear.out_features, linear.in_features):
            raise ConfigError(f"{source}: the LoRA of {prefix}.{module} has down {tuple(down.shape)} and up "
                              f"{tuple(up.shape)}; this model's layer is ({linear.out_features}, "
                              f"{linear.in_features}): a LoRA for another text encoder")
        alpha = float(roles["alpha"]) if "alpha" in roles else float(down.shape[0])
        out.setdefault(prefix, {})[module] = LoraLayer(down=down, up=up, alpha=alpha)
    return out, skipped, unmatched


def match_lora(tensors: Mapping[str, Tensor], bundle: Any, *, format: str | None = None,
               source: str = "the LoRA file") -> tuple[LoraWeights, list[str]]:
    """(what ``tensors`` apply to the bundle's network and text encoders, the keys that match no
    layer). Keys of text encoders the bundle does not name (``text_encoders``) are ``not_applicable``."""
    kind = formats.other_kind(tensors)
    if kind is not None:
        raise ConfigError(f"{source}: a {kind} file; diffcore applies plain LoRAs only (lora_down / lora_up or "
                          f"lora_A / lora_B pairs), so it is refused rather than half applied")
    format = formats.canonical(format) if format else formats.detect(tensors)
    names = _Names(bundle)
    text_keys = {k: v for k, v in tensors.items() if formats.not_applicable(k)}
    text, skipped, unmatched = match_text(text_keys, _text_encoders(bundle, list(text_keys)), source=source)
    found: dict[tuple[str, int, int, str], dict[str, Tensor]] = {}
    sources: dict[tuple[str, int, int, str], list[str]] = {}
    for key, tensor in tensors.items():
        if key in text_keys:
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
    return LoraWeights(layers=layers, format=format, not_applicable=skipped, text_encoders=text), unmatched


def load_lora(path: str | Path, bundle: Any) -> LoraWeights:
    """The LoRA in ``path`` (any supported format) on the bundle's network's layers; keys that
    match no layer are a ``ConfigError`` listing them."""
    tensors, _ = read_lora(path)
    weights, unmatched = match_lora(tensors, bundle, source=str(path))
    if unmatched:
        more = len(unmatched) - SHOWN
        shown = ", ".join(unmatched[:SHOWN]) + (f", ... ({more} more)" if more > 0 else "")
        raise ConfigError(f"{path}: {len(unmatched)} of its {len(tensors)} keys match no layer of "
                          f"{type(bundle.network).__name__} or its text encoders (read as {weights.format} "
                         f"format): {shown}. "
                          "A misspelled key, a LoRA for another model, or a format diffcore does not read")
    if not weights and not weights.text_encoders:
        text = f" (only {len(weights.not_applicable)} text-encoder keys)" if weights.not_applicable else ""
        raise ConfigError(f"{path}: no LoRA for this model's network in it{text}")
    if weights.not_applicable:
        names = getattr(bundle, "text_encoders", dict)()
        having = f"this model's trainable text encoders are {', '.join(names)}" if names else \
            "this model has no text encoders that take LoRAs"
        warnings.warn(f"{path}: {len(weights.not_applicable)} text-encoder keys (like {weights.not_applicable[0]}) "
                      f"are not applied: {having}", stacklevel=2)
    return weights


def _text_tensors(text_encoders: Mapping[str, Mapping[str, LoraLayer]], bundle: Any,
                  format: str) -> dict[str, Tensor]:
    """The text encoders' LoRAs in ``format``'s keys, their modules named as files name them
    (``text_file_names``, from the bundle's encoders); diffusers' without alpha, ``alpha / r`` folded into up."""
    out: dict[str, Tensor] = {}
    encoders = bundle.text_encoders() if text_encoders and hasattr(bundle, "text_encoders") else {}
    for prefix, layers in text_encoders.items():
        names = {ours: theirs for theirs, ours in text_file_names(encoders[prefix]).items()} if prefix in encoders \
            else {}
        for module, layer in layers.items():
            try:
                keys = formats.text_keys_for(format, prefix, names.get(module, module))
            except KeyError as exc:
                raise ConfigError(f"{exc.args[0]}: save a LoRA with text encoders as diffusers, kohya, comfyui or "
                                  "diffcore", path="save_format") from None
            out[keys["down"]] = layer.down.float()
            if "alpha" in keys:
                out[keys["up"]] = layer.up.float()
                out[keys["alpha"]] = torch.tensor(float(layer.alpha))
            else:
                out[keys["up"]] = layer.up.float() * layer.scale
    return out


def _tensors(weights: Mapping[str, LoraLayer], bundle: Any, format: str,
             text_encoders: Mapping[str, Mapping[str, LoraLayer]] | None = None) -> dict[str, Tensor]:
    format = formats.canonical(format)
    out: dict[str, Tensor] = _text_tensors(text_encoders or {}, bundle, format)
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
              format: str = "diffcore", text_encoders: Mapping[str, Mapping[str, LoraLayer]] | None = None) -> Path:
    """``weights`` as a ``format`` LoRA file, written atomically (a temporary file, then renamed);
    ``text_encoders`` (prefix -> module -> LoRA; default: a ``LoraWeights``' own) go in it too."""
    from diffcore.io.checkpoint import save_file_atomic

    if formats.canonical(format) not in formats.FORMATS:
        raise ConfigError(f"unknown LoRA format {format!r}; known: {', '.join(formats.FORMATS)}", path="save_format")
    if formats.canonical(format) == "diffusers" and bundle is None:
        raise ConfigError("saving a LoRA in diffusers' format needs the model (its module names)")
    path = Path(path)
    if text_encoders is None:
        text_encoders = getattr(weights, "text_encoders", {})
    text_encoders = {prefix: layers for prefix, layers in text_encoders.items() if layers}
    tensors = {k: v.contiguous() for k, v in _tensors(weights, bundle, format, text_encoders).items()}
    ranks = sorted({layer.rank for layer in weights.values()})
    metadata = {"format": formats.canonical(format), "rank": ",".join(map(str, ranks)),
                "targets": json.dumps(sorted(weights)),
                "network": type(bundle.network).__name__ if bundle is not None else ""}
    if text_encoders:
        metadata["text_encoders"] = json.dumps({prefix: sorted(layers) for prefix, layers in text_encoders.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file_atomic(tensors, path, metadata=metadata)
    return path
