"""Checkpoint loading into meta-device modules, and atomic saving.

One path for every family: ``load_model(build, files, rename=...)`` builds the network on the meta
device (no memory, no random init), reads the weights (safetensors through ``safe_open``, which
maps the file and reads a tensor only when asked), renames the keys with the family's converter,
casts, and hands the tensors to the module with ``load_state_dict(assign=True)``, so each weight
exists once in memory. Pickle files (``.ckpt .pt .pth .bin``) are read only in torch.save's zip
format and with ``torch.load(weights_only=True)``: anything but tensors and plain containers is
refused, and a raw or legacy pickle is not unpickled at all. A safetensors file's header is
checked first (``diffcore.io.headers``), so a damaged file is one message naming it.

Tensors the converter replaces by new ones (q, k and v fused into one qkv) are read through a
second mapping of the file (``load_model(..., copied=...)`` names them), which is unmapped when
the converter lets them go: otherwise their pages would stay resident beside the fused copies
(about 7% of a FLUX.2 checkpoint in diffusers' layout, measured by ``benchmarks/load.py``).

A module with non-persistent buffers (RoPE tables, masks) cannot get them from a checkpoint;
it defines ``init_buffers(device)``, which the loader calls after the weights are in place.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Union

import torch
from torch import nn

from diffcore.errors import CheckpointError
from diffcore.io.headers import check_safetensors, plain_safetensors_error
from diffcore.io.scaled_fp8 import dequantize, is_side_key, pop_scales
from diffcore.nn.fp8 import Float8Weight
from diffcore.nn.fp8_options import Rounding, rounding_while_loading

PathLike = Union[str, "os.PathLike[str]"]
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
INDEX_SUFFIX = ".safetensors.index.json"
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, n))
SHOWN = 5  # keys listed per kind of mismatch


# -- finding the files ----------------------------------------------------------------------------
def checkpoint_files(path: PathLike) -> list[Path]:
    """The weight files behind ``path``: a file, an ``*.safetensors.index.json`` (its shards), or a
    folder holding exactly one of those (an index wins over the shards it lists)."""
    return _resolve(Path(path))[0]


def _resolve(path: Path) -> tuple[list[Path], Path | None]:
    """(weight files, the index they came from or None)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        for pattern in (f"*{INDEX_SUFFIX}", "*.safetensors", *(f"*{s}" for s in PICKLE_SUFFIXES)):
            found = sorted(path.glob(pattern))
            if len(found) == 1:
                return _resolve(found[0])
            if found:
                names = ", ".join(p.name for p in found)
                raise CheckpointError(f"{path}: several weight files ({names}); name the one to load")
        raise CheckpointError(f"{path}: no *.safetensors, *{INDEX_SUFFIX} or "
                              f"{'/'.join(PICKLE_SUFFIXES)} file in this folder")
    if path.name.endswith(INDEX_SUFFIX):
        shards = sorted(set(_weight_map(path).values()))
        missing = [s for s in shards if not (path.parent / s).is_file()]
        if missing:
            raise CheckpointError(f"{path}: lists {len(missing)} shard(s) that are not in {path.parent}: "
                                  f"{', '.join(missing[:SHOWN])}")
        return [path.parent / s for s in shards], path
    if path.suffix == ".safetensors" or path.suffix in PICKLE_SUFFIXES:
        return [path], None
    raise CheckpointError(f"{path}: not a weights file (expected .safetensors, {INDEX_SUFFIX} "
                          f"or {', '.join(PICKLE_SUFFIXES)})")


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a safetensors index (needs a \"weight_map\"): {exc}") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: \"weight_map\" must map tensor names to shard files")
    return weight_map


# -- reading -------------------------------------------------------------------------------------
def tensor_shapes(path: PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape for every tensor behind ``path``, from the safetensors headers only (pickle
    files are mapped, not read). For detecting a layout or variant before loading anything."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in checkpoint_files(path):
        if file.suffix == ".safetensors":
            with _open_safetensors(file, "cpu") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if not is_side_key(k)})
        else:
            shapes.update({k: tuple(v.shape) for k, v in _load_pickle(file, "cpu").items()})
    return shapes


def load_state_dict(path: PathLike, *, device: str | torch.device = "cpu",
                    copied: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """All tensors behind ``path`` (file, sharded index, or folder), read one tensor at a time.

    A sharded index loads exactly the keys its ``weight_map`` names, each from its shard; a key
    found in two files is an error. Safetensors keys for which ``copied`` is true come from a
    mapping of their own (see ``load_model``).
    """
    files, index = _resolve(Path(path))
    wanted: dict[Path, set[str]] = {}
    if index is not None:
        for key, shard in _weight_map(index).items():
            wanted.setdefault(index.parent / shard, set()).add(key)
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in files:
        if file.suffix == ".safetensors":
            part = _read_safetensors(file, device, wanted.get(file) if index is not None else None, copied)
        else:
            part = _load_pickle(file, device)
        for key in part:
            if key in origin:
                raise CheckpointError(f"tensor {key!r} is in two files: {origin[key]} and {file}")
            origin[key] = file
        state.update(part)
    return state


def _open_safetensors(file: Path, device: str | torch.device):
    from safetensors import SafetensorError, safe_open

    header = check_safetensors(file)
    try:
        return safe_open(str(file), framework="pt", device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file: {plain_safetensors_error(str(exc), header)}") from None


def _read_safetensors(file: Path, device: str | torch.device, keys: set[str] | None,
                      copied: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    with _open_safetensors(file, device) as f:
        names = list(f.keys())
        if keys is not None:
            absent = sorted(keys - set(names))
            if absent:
                raise CheckpointError(f"{file}: the index places {len(absent)} tensor(s) in this shard that it "
                                      f"lacks: {', '.join(absent[:SHOWN])}")
            names = [k for k in names if k in keys]
        state = {k: f.get_tensor(k) for k in names if copied is None or not copied(k)}
    if len(state) < len(names):
        # a second mapping of the file that only these tensors hold: once the converter has made
        # its new tensors from them and let them go, it is unmapped and their pages leave the
        # resident set (with one mapping they would stay, counted beside the new copies)
        with _open_safetensors(file, device) as f:
            state.update({k: f.get_tensor(k) for k in names if k not in state})
    return {k: state[k] for k in names}


def _load_pickle(file: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    """Tensors from a ``torch.save`` zip file, unpickled with ``weights_only=True``. Anything
    else (a legacy or raw pickle, which could only be read by trusting it) is not opened."""
    try:
        with open(file, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot be read: {exc.strerror or exc}") from None
    if not magic:
        raise CheckpointError(f"{file}: empty file (0 bytes): an interrupted download or a placeholder, "
                              f"not torch weights")
    if magic != b"PK\x03\x04":
        raise CheckpointError(f"{file}: not a torch zip checkpoint (the format of torch.save since torch 1.6); "
                              f"diffcore does not unpickle legacy or raw pickle files, which can run code: "
                              f"convert it to safetensors with the tool that made it")
    try:
        obj = torch.load(file, map_location=device, weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" (it asks for {found[1]})" if found else ""
        raise CheckpointError(f"{file}: refused to unpickle it: it holds objects other than tensors and plain "
                              f"containers{what}, and diffcore loads pickles only with weights_only=True; convert "
                              f"it to safetensors with the tool that made it") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as exc:
        first = str(exc).splitlines()[0].split(". ")[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{file}: a damaged torch zip checkpoint (truncated download?): {first}") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # Lightning / original SD checkpoints
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{file}: holds a {type(obj).__name__}, not a mapping of tensor names to tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{file}: holds no tensors at its top level (keys: {', '.join(list(obj)[:SHOWN])})")
    return tensors


# -- loading into a module -----------------------------------------------------------------------
def load_model(build: Callable[[], nn.Module], files: PathLike | Sequence[PathLike], *,
               rename: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
               dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               strict: bool = True, copied: Callable[[str], bool] | None = None, denoiser: bool = False,
               rounding: Rounding | None = None) -> nn.Module:
    """Build ``build()`` on the meta device and fill it from ``files`` without a second copy.

    - ``rename`` maps the file's keys (and tensors: it may split or fuse them) to the module's;
      it may consume its argument (pop as it goes) to keep one copy alive.
    - ``dtype``: every floating tensor is cast to it; ``None`` casts each to the dtype its
      parameter was built with. fp8-stored weights are always upcast (never computed with).
    - ``strict``: missing, unexpected and mis-shaped keys are reported together in one
      ``CheckpointError``. With ``strict=False`` unexpected keys are ignored and missing ones
      are initialised by their module's ``reset_parameters()``; mis-shaped keys stay an error.
    - ``copied(key)``: true for the file keys that ``rename`` turns into new tensors (fuses,
      splits); those come from a mapping of their own, unmapped once ``rename`` drops them, so
      the resident set ends at one copy of the weights.
    - ``denoiser``: the module is a sampler's network. Inside ``diffcore.nn.fp8.rounding_on_load``
      (a generate job's ``weight_dtype`` / ``fp8_matmul``) its linear and convolution layers are built as fp8 ones
      and each weight is read on the CPU, moved and rounded on its own, so the full-precision
      network never exists at once, on ``device`` or in the CPU's memory.
    - ``rounding``: that rounding for any module (the text encoders' ``text_weight_dtype``).
    - A scaled fp8 file (ComfyUI's ``weight_scale`` / ``scale_weight`` beside fp8 weights,
      ``diffcore.io.scaled_fp8``) loads as its values, ``weight * scale``, its side keys dropped.
    - Modules defining ``init_buffers(device)`` get it called afterwards (non-persistent buffers).
    """
    where = str(files) if isinstance(files, (str, os.PathLike)) else ", ".join(map(str, files))
    with torch.device("meta"):
        model = build()
    if rounding is None and denoiser:
        rounding = rounding_while_loading()
    rounded = {}
    if rounding is not None:
        rounding.apply(model)
        rounded = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, Float8Weight)}
    state = _read_all([files] if isinstance(files, (str, os.PathLike)) else list(files),
                      "cpu" if rounded else device, copied)
    scales = pop_scales(state, where)   # a scaled fp8 file's: weight key -> scale
    later: dict[int, tuple[str, torch.Tensor, torch.Tensor]] = {}   # scaled ones left for the last loop: by
    # identity (the tensor is held too, so no new tensor of rename's can take its id)
    for key, tensor in state.items():  # before renaming: cheaper, and fp8 tensors don't cat/split everywhere
        untouched = not (rename is not None and (copied is None or copied(key)))   # renamed at most
        if rounded and untouched:
            if key in scales:   # only renamed (the same tensor object comes back): scaled one at a time below
                later[id(tensor)] = (key, scales[key], tensor)
            continue   # only renamed, not transformed: cast one at a time below
        if key in scales:
            state[key] = dequantize(tensor, scales[key], dtype or torch.float32)
        elif tensor.dtype in FP8_DTYPES and untouched:
            continue   # upcast one at a time below, straight to its dtype (exact: fp8 values are bf16 values)
        elif dtype is not None and tensor.is_floating_point():
            state[key] = tensor.to(dtype)
        elif tensor.dtype in FP8_DTYPES:
            state[key] = tensor.to(torch.float32)
    if rename is not None:
        try:
            state = rename(state)
        except CheckpointError as exc:
            raise CheckpointError(f"{where}: {exc}") from exc
        except (KeyError, ValueError, IndexError) as exc:
            raise CheckpointError(f"{where}: its keys could not be converted for {type(model).__name__}: "
                                  f"{type(exc).__name__}: {exc}") from exc

    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if misshaped or (strict and (missing or unexpected)):
        raise CheckpointError(_mismatch(where, model, missing if strict else [], unexpected if strict else [],
                                        [(k, state[k].shape, expected[k].shape) for k in misshaped]))
    for key in unexpected:
        later.pop(id(state.pop(key)), None)
    keys_of = Counter(id(t) for t in state.values())
    tied: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # one tensor under several keys (tied weights):
    # the original (held, so its id stays its own) and what it became, cast and copied once
    for key in list(state):
        target = dtype if dtype is not None else expected[key].dtype
        scaled = later.pop(id(state[key]), None)
        if scaled is not None:
            state[key] = dequantize(state[key].to(device), scaled[1], target)
        if key in rounded:   # rounded where it will live, then let go: one layer's full precision at a time
            weight = state.pop(key).to(device).to(target)   # through the compute dtype, as rounding after does
            rounded[key].assign_(weight, compute_dtype=target)
            continue
        tensor = state[key]
        if id(tensor) in tied:
            state[key] = tied[id(tensor)][1]
            continue
        if tensor.is_floating_point() and target.is_floating_point and target not in FP8_DTYPES:
            tensor = tensor.to(dtype=target)
        tensor = tensor.to(device)
        if rounded and tensor.data_ptr() == state[key].data_ptr() and tensor.device.type == "cpu":
            tensor = tensor.clone()   # not a view of the file: its mapping can close, with the rounded layers' pages
        if keys_of[id(state[key])] > 1:
            tied[id(state[key])] = (state[key], tensor)
        state[key] = tensor
    del tied
    if later:
        names = ", ".join(k for k, *_ in later.values())
        raise CheckpointError(f"{where}: {len(later)} scaled fp8 weight(s) ({names}) did not come through the key "
                              f"converter for {type(model).__name__} as they were (fused or split without being "
                              f"marked copied, or dropped), so their scales cannot follow")
    model.load_state_dict(state, strict=False, assign=True)
    del state
    if missing:
        _initialise(model, missing, device, dtype)
    for module in model.modules():
        if callable(getattr(module, "init_buffers", None)):
            module.init_buffers(torch.device(device))
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{where}: {type(model).__name__} still has {len(left)} tensor(s) on the meta device "
                              f"after loading ({', '.join(left[:SHOWN])}); a module with non-persistent buffers "
                              f"must define init_buffers(device)")
    return model


def _read_all(paths: list[PathLike], device: str | torch.device,
              copied: Callable[[str], bool] | None) -> dict[str, torch.Tensor]:
    if len(paths) == 1:
        return load_state_dict(paths[0], device=device, copied=copied)
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, PathLike] = {}
    for path in paths:
        part = load_state_dict(path, device=device, copied=copied)
        for key in part:
            if key in origin:
                raise CheckpointError(f"tensor {key!r} is in two checkpoints: {origin[key]} and {path}")
            origin[key] = path
        state.update(part)
    return state


def _mismatch(where: str, model: nn.Module, missing: list[str], unexpected: list[str],
              misshaped: list[tuple[str, torch.Size, torch.Size]]) -> str:
    def listing(items: list[str]) -> str:
        more = f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else ""
        return ", ".join(items[:SHOWN]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {listing(unexpected)}")
    if misshaped:
        parts.append(f"{len(misshaped)} mis-shaped key(s): " + listing(
            [f"{k} (checkpoint {list(got)}, model {list(want)})" for k, got, want in misshaped]))
    return f"{where} does not match {type(model).__name__}: " + "; ".join(parts)


def _initialise(model: nn.Module, missing: Iterable[str], device: str | torch.device,
                dtype: torch.dtype | None) -> None:
    """Fill keys absent from a non-strict load with their module's own initialisation: a
    detached copy of the owning module (its own tensors only, all on meta) is materialised and
    reset, and only the missing tensors are taken from it."""
    owners: dict[str, list[str]] = {}
    for key in missing:
        owner, _, name = key.rpartition(".")
        owners.setdefault(owner, []).append(name)
    for owner, names in owners.items():
        module = model.get_submodule(owner)
        if not callable(getattr(module, "reset_parameters", None)):
            raise CheckpointError(f"cannot initialise {', '.join(f'{owner}.{n}' for n in names)}: missing from the "
                                  f"checkpoint and {type(module).__name__} has no reset_parameters()")
        fresh = copy.copy(module)
        fresh._parameters = {n: None if p is None else nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
                             for n, p in module._parameters.items()}
        fresh._buffers = {n: None if b is None else torch.empty_like(b, device="meta")
                          for n, b in module._buffers.items()}
        fresh._modules = {}
        fresh.to_empty(device=device, recurse=False)
        fresh.reset_parameters()
        for name in names:
            tensor = getattr(fresh, name).detach()
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            if name in module._parameters:
                module._parameters[name] = nn.Parameter(tensor, requires_grad=module._parameters[name].requires_grad)
            else:
                module._buffers[name] = tensor


# -- saving --------------------------------------------------------------------------------------
def save_file_atomic(tensors: Mapping[str, torch.Tensor], path: PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file so that ``path`` is either the old file or the complete new one:
    the data goes to a temporary file in the same folder, is flushed to disk, then renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=dict(metadata) if metadata else None)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["check_safetensors", "checkpoint_files", "tensor_shapes", "load_state_dict", "load_model",
           "save_file_atomic", "CheckpointError", "PICKLE_SUFFIXES", "INDEX_SUFFIX"]



def cast_state(state: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating tensors cast to ``dtype`` (a torch dtype name; ``"keep"`` leaves them), for convert jobs."""
    if dtype == "keep":
        return dict(state)
    target = getattr(torch, dtype)
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}


def save_converted(state: Mapping[str, torch.Tensor], file: PathLike, config: dict | None = None) -> Path:
    """A converted state dict to ``file`` atomically (and ``config`` to config.json beside it), on
    the main process only. Split tensors are views of one fused tensor and safetensors stores each
    storage once, so every view after the first gets its own copy."""
    from diffcore.jobs import is_main_process

    file = Path(file)
    if not is_main_process():
        return file
    file.parent.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    tensors = {}
    for key, tensor in state.items():
        storage = tensor.untyped_storage().data_ptr()
        tensors[key] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    save_file_atomic(tensors, file, metadata={"format": "pt"})
    if config is not None:
        (file.parent / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return file
