"""Training checkpoints: one folder per step, written whole or not at all.

    checkpoints/step-000200/
        model.safetensors   the network's state dict
        ema.safetensors     the same keys with the EMA weights (a model file in its own right)
        optimizer.pt        optimizer state (torch.save; read back with weights_only=True)
        scheduler.json      the learning-rate schedule and the rate at this step
        rng.pt              per process: torch CPU (and CUDA), python ``random``, numpy states
        state.json          step, samples consumed, data sampler position, EMA counters, world size
        config.json         the resolved job config

Everything is written into ``step-000200.tmp/``, flushed, and the folder is renamed with
``os.replace``: a crash leaves at worst a ``*.tmp`` folder, which ``latest`` ignores and the
next save removes. ``keep_last`` prunes older step folders after each save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from diffcore.errors import CheckpointError

STEP_DIR = re.compile(r"^step-(\d+)$")
FILES = ("model.safetensors", "ema.safetensors", "optimizer.pt", "scheduler.json", "rng.pt", "state.json",
         "config.json")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first (``*.tmp`` never counts)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / "state.json").is_file()]


def remove_stale(root: Path) -> list[Path]:
    """Delete ``*.tmp`` folders and files left by an interrupted save; returns what was removed."""
    stale = sorted(root.glob("*.tmp")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return stale


def resolve(resume: str, root: Path) -> Path | None:
    """``"latest"`` -> the newest complete checkpoint under ``root`` (None when there is none yet),
    anything else is a checkpoint folder path."""
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    missing = [f for f in FILES if not (path / f).is_file()]
    if not path.is_dir() or missing:
        raise CheckpointError(f"resume = {resume!r}: not a training checkpoint folder"
                              + (f" (missing {', '.join(missing)})" if path.is_dir() else ""))
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
    save_file(_cpu(model), tmp / "model.safetensors")
    save_file(_cpu(ema), tmp / "ema.safetensors")
    torch.save(optimizer, tmp / "optimizer.pt")
    torch.save(rng, tmp / "rng.pt")
    for name, data in (("scheduler.json", scheduler), ("config.json", config), ("state.json", state)):
        (tmp / name).write_text(json.dumps(data, indent=2, default=str) + "\n")
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():  # the same step saved before (a run restarted without resume)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old)
    return final


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
