"""LoRA adapters on a network for inference: merged into the weights, or kept beside them.

Merged costs nothing per step but changes the weights (``unmerge`` subtracts the same update);
kept unmerged, each target ``nn.Linear`` is wrapped so its output gains ``scale * up(down(x))``,
several LoRAs stacking, and the base weights stay as they were (to switch LoRAs or scales
between requests).
"""

from __future__ import annotations

import torch
from torch import nn

from diffcore.lora.files import LoraWeights


class LoraLinear(nn.Module):
    """``base(x) + sum_i scale_i * (x @ down_i^T) @ up_i^T * alpha_i / rank_i``; ``plain()`` is false
    for it, so blocks call it as a module rather than fusing the base matmul."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for down, up, factor in self.adapters:
            out = out + factor * nn.functional.linear(nn.functional.linear(x, down.to(x)), up.to(x))
        return out


def _parent(network: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (network.get_submodule(parent) if parent else network), child


@torch.no_grad()
def apply_lora(network: nn.Module, weights: LoraWeights, *, scale: float = 1.0, merge: bool = True) -> None:
    """Add ``weights`` at ``scale`` to ``network``: into the weights (``merge``) or as wrappers."""
    for name, layer in weights.items():
        module = network.get_submodule(name)
        if merge:
            target = module.base if isinstance(module, LoraLinear) else module
            target.weight.add_((scale * layer.delta()).to(target.weight))
            continue
        if not isinstance(module, LoraLinear):
            parent, child = _parent(network, name)
            module = LoraLinear(module)
            setattr(parent, child, module)
        device = module.weight.device
        module.adapters.append((layer.down.to(device), layer.up.to(device), scale * layer.alpha / layer.rank))


@torch.no_grad()
def unmerge_lora(network: nn.Module, weights: LoraWeights, *, scale: float = 1.0) -> None:
    """Take back what ``apply_lora(merge=True)`` added (up to rounding in low precision)."""
    apply_lora(network, weights, scale=-scale, merge=True)
