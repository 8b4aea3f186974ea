"""Checkpoint loading into meta-device modules, and atomic saving.

One path for every family: ``load_model(build, files, rename=...)`` builds the network on the meta
device (no memory, no random init), reads the weights (safetensors through ``safe_open``, which
maps the file and reads a tensor only when asked), renames the keys with the family's converter,
casts, and hands the tensors to the module with ``load_state_dict(assign=True)``, so each weight
exists once in memory. Pickle files (``.ckpt .pt .pth .bin``) are read only with
``torch.load(weights_only=True)``: anything but tensors and plain containers is refused.

Tensors the converter replaces by new ones (q, k and v fused into one qkv) are the exception:
``load_model(..., copied=...)`` names them, and they are read with plain file reads into process
memory instead, so their file pages are never mapped next to the fused copy (which would count
twice in the resident set, about 7% of a FLUX.2 checkpoint in diffusers' layout).

A module with non-persistent buffers (RoPE tables, masks) cannot get them from a checkpoint;
it defines ``init_buffers(device)``, which the loader calls after the weights are in place.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Union

import torch
from torch import nn

from diffcore.errors import CheckpointError

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
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        else:
            shapes.update({k: tuple(v.shape) for k, v in _load_pickle(file, "cpu").items()})
    return shapes


def load_state_dict(path: PathLike, *, device: str | torch.device = "cpu",
                    copied: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """All tensors behind ``path`` (file, sharded index, or folder), read one tensor at a time.

    A sharded index loads exactly the keys its ``weight_map`` names, each from its shard; a key
    found in two files is an error. Safetensors keys for which ``copied`` is true are read into
    process memory with plain reads; the others are views of the mapped file.
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

    try:
        return safe_open(str(file), framework="pt", device=str(device))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None


def _read_safetensors(file: Path, device: str | torch.device, keys: set[str] | None,
                      copied: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    with _open_safetensors(file, device) as f:  # validates the header for both paths
        names = list(f.keys())
        if keys is not None:
            absent = sorted(keys - set(names))
            if absent:
                raise CheckpointError(f"{file}: the index places {len(absent)} tensor(s) in this shard that it "
                                      f"lacks: {', '.join(absent[:SHOWN])}")
            names = [k for k in names if k in keys]
        plain = {k for k in names if copied is not None and copied(k)}
        state = {k: f.get_tensor(k) for k in names if k not in plain}
    if plain:
        state.update({k: t.to(device) for k, t in _read_unmapped(file, plain).items()})
    return {k: state[k] for k in names}


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool,
                      **({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
                         if hasattr(torch, "float8_e4m3fn") else {})}


def _read_unmapped(file: Path, keys: set[str]) -> dict[str, torch.Tensor]:
    """``keys`` of a safetensors file read with ``readinto`` into fresh CPU tensors, never mapped
    (format: 8-byte little-endian header size, JSON header, then the data;
    https://github.com/huggingface/safetensors#format)."""
    out: dict[str, torch.Tensor] = {}
    with open(file, "rb", buffering=0) as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        for key in sorted(keys, key=lambda k: header[k]["data_offsets"][0]):  # sequential reads
            entry = header[key]
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{file}: tensor {key!r} has dtype {entry['dtype']}, which this PyTorch "
                                      f"cannot hold")
            tensor = torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
            begin, end = entry["data_offsets"]
            if end - begin != tensor.numel() * tensor.element_size():
                raise CheckpointError(f"{file}: tensor {key!r} has {end - begin} bytes for shape {entry['shape']} "
                                      f"{entry['dtype']}")
            if tensor.numel():
                f.seek(8 + size + begin)
                view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
                got = f.readinto(view)
                if got != end - begin:
                    raise CheckpointError(f"{file}: truncated: tensor {key!r} needs {end - begin} bytes at offset "
                                          f"{8 + size + begin}, the file has {got}")
            out[key] = tensor
    return out


def _load_pickle(file: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(file, map_location=device, weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{file}: refused to unpickle it: it holds objects other than tensors and plain "
                              f"containers, and diffcore loads pickles only with weights_only=True; convert it to "
                              f"safetensors with the tool that made it ({str(exc).splitlines()[0]})") from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise CheckpointError(f"{file}: cannot be read as a torch zip checkpoint with mmap "
                              f"(legacy or damaged file?): {exc}") from None
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
               strict: bool = True, copied: Callable[[str], bool] | None = None) -> nn.Module:
    """Build ``build()`` on the meta device and fill it from ``files`` without a second copy.

    - ``rename`` maps the file's keys (and tensors: it may split or fuse them) to the module's;
      it may consume its argument (pop as it goes) to keep one copy alive.
    - ``dtype``: every floating tensor is cast to it; ``None`` casts each to the dtype its
      parameter was built with. fp8-stored weights are always upcast (never computed with).
    - ``strict``: missing, unexpected and mis-shaped keys are reported together in one
      ``CheckpointError``. With ``strict=False`` unexpected keys are ignored and missing ones
      are initialised by their module's ``reset_parameters()``; mis-shaped keys stay an error.
    - ``copied(key)``: true for the file keys that ``rename`` turns into new tensors (fuses,
      splits); those are read into memory instead of mapped, so peak memory stays one copy.
    - Modules defining ``init_buffers(device)`` get it called afterwards (non-persistent buffers).
    """
    where = str(files) if isinstance(files, (str, os.PathLike)) else ", ".join(map(str, files))
    with torch.device("meta"):
        model = build()
    state = _read_all([files] if isinstance(files, (str, os.PathLike)) else list(files), device, copied)
    for key, tensor in state.items():  # before renaming: cheaper, and fp8 tensors don't cat/split everywhere
        if dtype is not None and tensor.is_floating_point():
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
        del state[key]
    for key, tensor in state.items():
        target = dtype if dtype is not None else expected[key].dtype
        if tensor.is_floating_point() and target.is_floating_point and target not in FP8_DTYPES:
            tensor = tensor.to(dtype=target)
        state[key] = tensor.to(device)
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


__all__ = ["checkpoint_files", "tensor_shapes", "load_state_dict", "load_model", "save_file_atomic",
           "CheckpointError", "PICKLE_SUFFIXES", "INDEX_SUFFIX"]

