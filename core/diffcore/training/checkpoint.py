"""Training checkpoints: one folder per step, written whole or not at all.

    checkpoints/step-000200/
        model.safetensors   the network's state dict
        ema.safetensors     the same keys with the EMA weights (a model file in its own right)
        optimizer.pt        optimizer state (torch.save; read back with weights_only=True)
        scheduler.json      the learning-rate schedule and the rate at this step
        rng.pt              per process: torch CPU (and CUDA), python ``random``, numpy states
        state.json          step, samples consumed, data sampler position, EMA counters, world size
        config.json         the resolved job config
        manifest.json       written last: every other file's size in bytes

Everything is written into ``step-000200.tmp/``, each file fsynced, the manifest last, the
folder fsynced and renamed with ``os.replace``, then the parent fsynced. A process killed at any
point leaves the previous checkpoints as they were plus at worst a ``*.tmp`` folder, which
``latest`` never picks and the next run removes. Old checkpoints (``keep_last``) and a step
saved again are renamed to ``*.tmp`` before they are deleted, so an interrupted delete leaves
no half-empty step folder either. A step folder counts as a checkpoint only when its manifest is
there and every size matches (folders from before manifests: when every file is there).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from diffcore.errors import CheckpointError

STEP_DIR = re.compile(r"^step-(\d+)$")
FILES = ("model.safetensors", "ema.safetensors", "optimizer.pt", "scheduler.json", "rng.pt", "state.json",
         "config.json")
MANIFEST = "manifest.json"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def incomplete(path: Path) -> str | None:
    """Why ``path`` is not a whole checkpoint folder, or None when it is one."""
    if not path.is_dir():
        return "not a folder"
    try:
        sizes = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:  # written before manifests existed: the file names are all there is to check
        sizes = dict.fromkeys(FILES)
    except (OSError, ValueError, KeyError, TypeError):
        sizes = None
    if not isinstance(sizes, dict):
        return f"its {MANIFEST} is unreadable"
    sizes = {**dict.fromkeys(FILES), **sizes}  # every file a resume reads, whatever the manifest lists
    missing = [name for name in sizes if not (path / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    for name, size in sizes.items():
        if size is not None and (found := (path / name).stat().st_size) != size:
            return f"{name} has {found} bytes, {MANIFEST} says {size}"
    return None


def scan(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Step folders under ``root``, oldest first: the complete ones, and the others with the reason."""
    if not root.is_dir():
        return [], []
    found = sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=_step)
    complete, broken = [], []
    for p in found:
        if (reason := incomplete(p)) is None:
            complete.append(p)
        else:
            broken.append((p, reason))
    return complete, broken


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first (``*.tmp`` never counts)."""
    return scan(root)[0]


def remove_stale(root: Path) -> list[Path]:
    """Delete ``*.tmp`` folders and files left by an interrupted save or delete; returns what was removed."""
    stale = sorted(root.glob("*.tmp")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return stale


def resolve(resume: str, root: Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """``"latest"`` -> the newest complete checkpoint under ``root`` (None when there is none yet;
    ``warn`` hears about every newer folder passed over), anything else is a checkpoint folder path."""
    if resume == "latest":
        found, broken = scan(root)
        newest = found[-1] if found else None
        for path, reason in broken:
            if warn is not None and (newest is None or _step(path) > _step(newest)):
                warn(f"ignoring {path}: not a complete checkpoint ({reason})")
        return newest
    path = Path(resume)
    reason = incomplete(path)
    if reason is not None:
        raise CheckpointError(f"resume = {resume!r}: not a training checkpoint folder ({reason})")
    return path


def save(root: Path, step: int, *, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor],
         optimizer: dict[str, Any], scheduler: dict[str, Any], rng: list[dict[str, Any]], state: dict[str, Any],
         config: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically, then keep only the newest ``keep_last``."""
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root)
    tmp.mkdir()
    writers: dict[str, Callable[[Path], Any]] = {
        "model.safetensors": lambda f: save_file(_cpu(model), f),
        "ema.safetensors": lambda f: save_file(_cpu(ema), f),
        "optimizer.pt": lambda f: torch.save(optimizer, f),
        "rng.pt": lambda f: torch.save(rng, f),
        **{name: _json_writer(data) for name, data in
           (("scheduler.json", scheduler), ("config.json", config), ("state.json", state))},
    }
    for name, write in writers.items():
        write(tmp / name)
        _fsync(tmp / name)
    sizes = {name: (tmp / name).stat().st_size for name in writers}
    _json_writer({"step": step, "files": sizes})(tmp / MANIFEST)   # the mark of a finished folder
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    if final.exists():  # the same step saved before (a run restarted without resume)
        _discard(final)
    os.replace(tmp, final)
    _fsync(root)
    prune(root, keep_last)
    return final


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints."""
    for old in list_checkpoints(root)[:-keep_last]:
        _discard(old)


def load(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Everything ``save`` wrote, tensors on ``device`` (optimizer state included)."""
    device = torch.device(device)
    where = "cpu" if device.type == "cpu" else str(device)  # safetensors knows "cpu", not accelerate's "cpu:0"
    try:
        return {
            "model": load_file(path / "model.safetensors", device=where),
            "ema": load_file(path / "ema.safetensors", device=where),
            "optimizer": torch.load(path / "optimizer.pt", map_location=where, weights_only=True),
            "rng": torch.load(path / "rng.pt", map_location="cpu", weights_only=True),
            "scheduler": json.loads((path / "scheduler.json").read_text()),
            "state": json.loads((path / "state.json").read_text()),
            "config": json.loads((path / "config.json").read_text()),
        }
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read training checkpoint {path}: {exc}") from exc


def rng_state() -> dict[str, Any]:
    """This process's global random states, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def _json_writer(data: Any) -> Callable[[Path], Any]:
    return lambda f: f.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _discard(path: Path) -> None:
    """Rename, then delete: a delete cut short leaves a ``*.tmp`` folder, not a half-empty step folder."""
    trash = path.with_name(path.name + ".old.tmp")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    shutil.rmtree(trash)
