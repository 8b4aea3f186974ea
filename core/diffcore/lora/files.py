"""LoRA files in the formats people trade, read into and written from one in-memory form.

``LoraWeights`` maps a module name of *our* network to ``LoraLayer(down, up, alpha)``: the update
of its weight is ``up @ down * alpha / rank``. Formats (detected from the keys):

============  =====================================================================  ===============
format        keys                                                                   module names
============  =====================================================================  ===============
diffusers     ``transformer.<m>.lora_A.weight`` / ``.lora_B.weight`` (``unet.`` for     diffusers'
              SDXL; PEFT's files without the prefix too; ``.alpha`` optional)
kohya         ``lora_unet_<m with _ for .>.lora_down.weight`` / ``.lora_up.weight``   ours (FLUX: BFL)
              / ``.alpha`` (sd-scripts; ``lora_te*`` text-encoder keys are skipped,
              with a warning)
comfyui       ``diffusion_model.<m>.lora_A.weight`` / ``.lora_B.weight`` (or            ours
              ``lora_down`` / ``lora_up``), ``.alpha``
diffcore      ``<m>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha`` (what the ``lora`` ours
              trainer writes; BFL's naming for FLUX)
============  =====================================================================  ===============

Where diffcore fuses projections that diffusers keeps apart (FLUX's q, k, v in one ``qkv``;
``linear1`` = q, k, v and the MLP's input), separate adapters of ranks r_i fuse exactly into one
of rank sum r_i: ``down`` the stacked A_i, ``up`` block-diagonal with each B_i scaled by its
alpha_i / r_i (alpha = the total rank, scale 1); a part the file lacks is a zero block. Writing a
fused adapter in diffusers' layout splits it exactly: every part shares ``down`` and takes its
rows of ``up``. Keys that match no layer are an error listing them, never a silent no-op.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from diffcore.errors import CheckpointError, ConfigError

FORMATS = ("diffusers", "kohya", "comfyui", "diffcore")
_SUFFIXES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_down.weight": "down", "lora_up.weight": "up",
             "alpha": "alpha"}


@attrs.frozen(eq=False)
class LoraLayer:
    down: torch.Tensor    # (rank, in)
    up: torch.Tensor      # (out, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """The update of the layer's weight, (out, in), in float32."""
        return self.up.float() @ self.down.float() * (self.alpha / self.rank)


LoraWeights = dict[str, LoraLayer]


# -- reading -------------------------------------------------------------------------------------------
def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA file's tensors and metadata; safetensors only: a pickle (.pt, .ckpt, .bin) is refused
    unread, since unpickling runs whatever code it holds."""
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"LoRA file {path} does not exist", path="lora.path")
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(f"{path}: LoRA files load from .safetensors only (a {path.suffix} pickle could run code); "
                          f"convert it with a tool you trust", path="lora.path")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def detect_format(keys: list[str]) -> str:
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui"
    if any(k.startswith(("transformer.", "unet.")) for k in keys):
        return "diffusers"
    if any(".processor." in k and "_lora" in k for k in keys):
        raise ConfigError("this is an XLabs-format LoRA (double_blocks.N.processor.qkv_lora1...): not supported yet; "
                          "convert it to diffusers' format", path="lora.path")
    return "diffcore"


def split_entries(tensors: Mapping[str, torch.Tensor], fmt: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """{module name in the file's naming: {"down", "up", "alpha"?}} and the keys that are not LoRA keys."""
    entries: dict[str, dict[str, Any]] = {}
    stray = []
    for key, value in tensors.items():
        name = key
        if fmt == "comfyui":
            name = name.removeprefix("diffusion_model.")
        elif fmt == "diffusers":
            name = name.removeprefix("transformer.").removeprefix("unet.")
        name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")   # PEFT's adapter name
        part = next((s for s in _SUFFIXES if name.endswith("." + s)), None)
        if part is None:
            stray.append(key)
            continue
        module = name[:-len(part) - 1]
        entries.setdefault(module, {})[_SUFFIXES[part]] = value
    return entries, stray


def load_lora(path: str | Path, bundle: Any) -> LoraWeights:
    """The file at ``path`` as adapters on ``bundle.network``'s linear layers."""
    tensors, metadata = read_tensors(path)
    fmt = detect_format(list(tensors))
    entries, stray = split_entries(tensors, fmt)
    alpha = _metadata_alpha(metadata)
    if alpha is not None:   # diffusers' lora_adapter_metadata (peft's LoraConfig): one alpha for every layer
        entries = {m: {"alpha": torch.tensor(alpha), **e} for m, e in entries.items()}
    if fmt == "kohya":
        skipped = [m for m in entries if m.startswith("lora_te")]
        if skipped:
            warnings.warn(f"{path}: {len(skipped)} text-encoder adapters ({skipped[0]}, ...) are skipped: diffcore "
                          "applies LoRAs to the denoiser", stacklevel=2)
        entries = {m: e for m, e in entries.items() if not m.startswith("lora_te")}
    incomplete = [m for m, e in entries.items() if "down" not in e or "up" not in e]
    linears = linear_layers(bundle.network)
    resolve = _resolver(fmt, bundle, linears)
    parts: dict[str, dict[int, dict[str, Any]]] = {}
    unmatched = list(stray) + incomplete
    for module, entry in entries.items():
        if module in incomplete:
            continue
        target = resolve(module)
        if target is None:
            unmatched.append(module)
            continue
        ours, index, count = target
        parts.setdefault(ours, {})[index] = {**entry, "parts": count}
    if unmatched:
        shown = ", ".join(unmatched[:10]) + (f", ... ({len(unmatched)} in all)" if len(unmatched) > 10 else "")
        raise ConfigError(f"{path}: {len(unmatched)} LoRA keys match no layer of {type(bundle.network).__name__} "
                          f"(a {fmt}-format file): {shown}", path="lora.path")
    return {ours: _fuse(linears[ours], p) for ours, p in parts.items()}


def linear_layers(network: nn.Module) -> dict[str, nn.Module]:
    """The network's linear layers by name; one wrapped by an adapter (an unmerged LoRA's
    ``base``, peft's ``base_layer``) under the wrapper's name."""
    out = {}
    for name, module in network.named_modules():
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            wrapped = child in ("base", "base_layer") and parent and (
                hasattr(network.get_submodule(parent), "adapters") or hasattr(network.get_submodule(parent), "lora_A"))
            out[parent if wrapped else name] = module
    return out


def _metadata_alpha(metadata: dict[str, str]) -> float | None:
    """``lora_alpha`` from diffusers' ``lora_adapter_metadata`` JSON (keys maybe prefixed ``transformer.``)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        return None
    found = [v for k, v in config.items() if k.split(".")[-1] == "lora_alpha"] if isinstance(config, dict) else []
    return float(found[0]) if found else None


def _resolver(fmt: str, bundle: Any, linears: dict[str, nn.Module]):
    """module name in the file -> (our module, part index, number of parts) or None."""
    if fmt == "diffusers":
        table: dict[str, tuple[str, int, int]] = {}
        groups: dict[str, list[str]] = {}
        for theirs, ours in bundle.diffusers_modules(list(linears)):
            groups.setdefault(ours, []).append(theirs)
        for ours, names in groups.items():
            for i, theirs in enumerate(names):
                table[theirs] = (ours, i, len(names))
        same = {n: (n, 0, 1) for n in linears}   # a family whose names are diffusers' already (SDXL's UNet)
        return lambda m: table.get(m, same.get(m))
    if fmt == "kohya":
        flat = {n.replace(".", "_"): n for n in linears}
        return lambda m: (flat[m.removeprefix("lora_unet_")], 0, 1) if m.removeprefix("lora_unet_") in flat else None
    return lambda m: (m, 0, 1) if m in linears else None


def part_sizes(layer: nn.Module, count: int) -> list[int]:
    """Rows of each of ``count`` diffusers parts in a fused layer: q, k and v as wide as the input
    (FLUX's ``qkv`` and ``linear1``), a further part (``proj_mlp``) the rest."""
    out, width = layer.out_features, layer.in_features
    if count == 1:
        return [out]
    if count == 3 and out == 3 * width:
        return [width] * 3
    if count == 4 and out > 3 * width:
        return [width] * 3 + [out - 3 * width]
    if out % count == 0:
        return [out // count] * count
    raise ConfigError(f"cannot tell the row blocks of a fused layer of {out} rows made of {count} parts")


def _fuse(layer: nn.Module, parts: dict[int, dict[str, Any]]) -> LoraLayer:
    count = next(iter(parts.values()))["parts"]
    sizes = part_sizes(layer, count)
    offsets = [sum(sizes[:i]) for i in range(count)]
    downs, col = [], 0
    total_rank = sum(p["down"].shape[0] for p in parts.values())
    up = torch.zeros(layer.out_features, total_rank)
    for i in sorted(parts):
        p = parts[i]
        down, b = p["down"].float(), p["up"].float()
        rank = down.shape[0]
        alpha = float(p["alpha"]) if "alpha" in p else float(rank)
        if b.shape[0] != sizes[i] or down.shape[1] != layer.in_features:
            raise ConfigError(f"a LoRA part of shape up {tuple(b.shape)}, down {tuple(down.shape)} does not fit rows "
                              f"{sizes[i]} x inputs {layer.in_features} of the layer", path="lora.path")
        downs.append(down)
        up[offsets[i]:offsets[i] + sizes[i], col:col + rank] = b * (alpha / rank)
        col += rank
    if count == 1:   # one part: keep its alpha and B as they are
        p = parts[0]
        return LoraLayer(p["down"].float(), p["up"].float(), float(p["alpha"]) if "alpha" in p else float(p["down"].shape[0]))
    return LoraLayer(torch.cat(downs), up, float(total_rank))


# -- writing -------------------------------------------------------------------------------------------
def save_lora(path: str | Path, weights: LoraWeights, bundle: Any = None, *, format: str = "diffcore",
              metadata: dict[str, str] | None = None) -> Path:
    """Write ``weights`` in ``format``, atomically; the metadata records the format, ranks and targets."""
    from safetensors.torch import save_file

    if format not in FORMATS:
        raise ConfigError(f"unknown LoRA format {format!r}; expected one of {', '.join(FORMATS)}", path="format")
    tensors: dict[str, torch.Tensor] = {}
    if format == "diffusers":
        if bundle is None:
            raise ConfigError("writing diffusers' format needs the model, to name its layers", path="format")
        linears = linear_layers(bundle.network)
        groups: dict[str, list[str]] = {}
        for theirs, ours in bundle.diffusers_modules(list(weights)):
            groups.setdefault(ours, []).append(theirs)
        for ours, layer in weights.items():
            names = groups.get(ours, [ours])
            sizes = part_sizes(linears[ours], len(names))
            up = layer.up.float() * (layer.alpha / layer.rank)   # alpha folded in: diffusers' scale is 1
            for theirs, rows in zip(names, up.split(sizes)):
                tensors[f"transformer.{theirs}.lora_A.weight"] = layer.down.float().clone()   # a copy per part
                tensors[f"transformer.{theirs}.lora_B.weight"] = rows.contiguous()
    else:
        for ours, layer in weights.items():
            if format == "kohya":
                base, down, up = f"lora_unet_{ours.replace('.', '_')}", "lora_down.weight", "lora_up.weight"
            else:
                base, down, up = ("diffusion_model." if format == "comfyui" else "") + ours, "lora_A.weight", "lora_B.weight"
            tensors[f"{base}.{down}"] = layer.down.float().contiguous()
            tensors[f"{base}.{up}"] = layer.up.float().contiguous()
            tensors[f"{base}.alpha"] = torch.tensor(float(layer.alpha))
    ranks = sorted({layer.rank for layer in weights.values()})
    info = {"format": format, "rank": ",".join(map(str, ranks)), "targets": json.dumps(sorted(weights)),
            **(metadata or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=info)
    os.replace(tmp, path)
    return path
