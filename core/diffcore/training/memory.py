"""What a training run holds in memory before its first activation, checked against what the
device has, so a run that cannot fit stops at once with the figure instead of failing (or
swapping) an hour in, after the model has loaded.

Per parameter: its weights in their dtype; per trainable parameter also its gradient (same
dtype), the optimizer's state (AdamW: two float32 moments, 8 bytes; 8-bit AdamW: 2 bytes) and the
EMA's float32 shadow (4 bytes). Activations come on top and depend on batch, resolution and
gradient checkpointing, so the check leaves them out and says so.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from diffcore.errors import ConfigError

GiB = 1 << 30
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "muon": 8}   # per trainable element (muon: AdamW's bound)


def training_bytes(network: nn.Module, trainable: Iterable[nn.Parameter], optimizer: str) -> dict[str, int]:
    trainable = list(trainable)
    weights = sum(p.numel() * p.element_size() for p in network.parameters())
    grads = sum(p.numel() * p.element_size() for p in trainable)
    elements = sum(p.numel() for p in trainable)
    return {"weights": weights, "gradients": grads, "optimizer": elements * OPTIMIZER_BYTES.get(optimizer, 8),
            "ema": elements * 4}


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: CUDA's free bytes, the CPU's MemAvailable; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if device.type == "cpu" and meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def check_fits(network: nn.Module, trainable: Iterable[nn.Parameter], optimizer: str, device: torch.device,
               available: int | None = None) -> dict[str, int]:
    """The estimate; a ``ConfigError`` stating it when it exceeds ``available`` (default: the device's free memory).
    The network's weights already sit on the device, so only what training adds must be free."""
    need = training_bytes(network, trainable, optimizer)
    available = available_bytes(device) if available is None else available
    extra = need["gradients"] + need["optimizer"] + need["ema"]
    if available is not None and extra > available:
        parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in need.items())
        raise ConfigError(f"this run needs about {(extra + need['weights']) / GiB:.1f} GiB before activations "
                          f"({parts} GiB) and {device} has {available / GiB:.1f} GiB free beyond the loaded weights: "
                          f"train a LoRA (trainer.name = \"lora\"), or use optimizer = \"adamw8bit\", or a larger device",
                          path="job.optimizer")
    return need
