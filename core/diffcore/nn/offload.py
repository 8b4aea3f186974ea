"""Where a family's components (text encoders, denoiser, autoencoder) live between uses.

- ``"none"``: everything on the device, all the time (fastest; needs room for all of it).
- ``"model"``: everything in CPU memory; a component moves to the device just before it runs
  and back when another one is about to (BFL's ``--offload``, diffusers'
  ``enable_model_cpu_offload``). The text encoders run first and have left the device before the
  transformer arrives, so the device holds one component at a time.
- ``"sequential"``: accelerate's ``cpu_offload`` hooks on every component: each layer's weights
  are copied to the device for its own forward only (diffusers' ``enable_sequential_cpu_offload``;
  least memory, slowest). Parameters then read as ``meta`` between calls, so callers take the
  device and dtype from here, never from a parameter.

The mechanism stays outside the model code: blocks never know where their weights are. A
bundle registers its components (``add``) and announces each one before it runs (``use``);
it takes the device from ``Offload.device``, never from a parameter. FLUX.1 uses it.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MODES", "Offload"]

MODES = ("none", "model", "sequential")


class Offload:
    """Places registered components and moves them as ``use(name)`` announces which runs next."""

    def __init__(self, mode: str = "none", device: str | torch.device = "cpu"):
        if mode not in MODES:
            raise ValueError(f"offload must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode, self.device = mode, torch.device(device)
        self.components: dict[str, nn.Module] = {}
        self.active: str | None = None

    @property
    def storage(self) -> torch.device:
        """Where components are loaded: the device itself, or CPU memory when offloading."""
        return self.device if self.mode == "none" else torch.device("cpu")

    def add(self, name: str, module: nn.Module) -> nn.Module:
        """Register ``module`` (loaded on ``storage``) and put it where this mode keeps it."""
        if self.mode == "sequential":
            from accelerate import cpu_offload

            cpu_offload(module, execution_device=self.device)
        else:
            module.to(self.storage)
        self.components[name] = module
        return module

    def use(self, name: str) -> None:
        """``name`` is about to run: in ``"model"`` mode, every other component leaves the device
        first, then this one comes. Components never registered stay where they are."""
        if self.mode != "model" or self.active == name or name not in self.components:
            return
        for other, module in self.components.items():
            if other != name:
                module.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.components[name].to(self.device)
        self.active = name
