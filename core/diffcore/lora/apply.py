"""Putting a LoRA into a network: merged (the delta added to each weight, in place) or unmerged
(a forward hook on the ``nn.Linear`` adding ``scale * up(down(x))``; several stack, and the
hook makes ``diffcore.nn.linear.plain`` false, so no block fuses around the adapter). Layers
stored in fp8 (``diffcore.nn.fp8.Float8Linear``) take both: a merged delta is added to the
dequantised weight and rounded again, an unmerged branch computes in the layer's own dtype."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from diffcore.errors import ConfigError
from diffcore.lora.weights import LoraLayer, LoraWeights
from diffcore.nn.fp8 import Float8Linear

SLOT = "diffcore_lora"   # the nn.ModuleList of branches on an adapted Linear


class LoraBranch(nn.Module):
    """``scale * up(down(x))``; the matrices are buffers that no state dict saves."""

    def __init__(self, layer: LoraLayer, scale: float, *, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.register_buffer("down", layer.down.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("up", layer.up.to(device=device, dtype=dtype), persistent=False)
        self.scale = scale * layer.scale

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.down.T.to(x.dtype)) @ (self.up.T.to(x.dtype) * self.scale)


def _hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    for branch in getattr(module, SLOT):
        output = output + branch(args[0])
    return output


def apply_lora(network: nn.Module, weights: Mapping[str, LoraLayer], scale: float = 1.0, *, merge: bool = True) -> None:
    modules = dict(network.named_modules())
    for name, layer in weights.items():
        linear = modules.get(name)
        if not isinstance(linear, (nn.Linear, Float8Linear)):
            raise ConfigError(f"the LoRA targets {name}, which is no linear layer of {type(network).__name__}")
        fp8 = isinstance(linear, Float8Linear)
        if merge and fp8:
            linear.add_(scale * layer.delta())
            continue
        if merge:
            with torch.no_grad():
                w = linear.weight
                w.copy_((w.float() + scale * layer.delta().to(w.device)).to(w.dtype))
            continue
        if SLOT not in linear._modules:
            linear.add_module(SLOT, nn.ModuleList())
            linear._diffcore_lora_hook = linear.register_forward_hook(_hook)
        weight = linear.scale if fp8 else linear.weight   # a Float8Linear's weight would be dequantised
        dtype, device = linear.compute_dtype if fp8 else weight.dtype, weight.device
        getattr(linear, SLOT).append(LoraBranch(layer, scale, dtype=dtype, device=device))


def apply_lora_to_bundle(bundle: Any, weights: LoraWeights, scale: float = 1.0, *, merge: bool = True) -> None:
    """A loaded LoRA file's parts onto the bundle: the network's layers, and each text encoder's
    (``bundle.text_encoders()``, by the file's prefix), merged or unmerged alike."""
    apply_lora(bundle.network, weights, scale, merge=merge)
    if weights.text_encoders:
        encoders = bundle.text_encoders()
        for prefix, layers in weights.text_encoders.items():
            apply_lora(encoders[prefix], layers, scale, merge=merge)


def remove_lora(network: nn.Module) -> int:
    """Take every unmerged LoRA off ``network``; returns how many layers had one."""
    n = 0
    for module in network.modules():
        if SLOT in module._modules:
            module._diffcore_lora_hook.remove()
            del module._modules[SLOT], module._diffcore_lora_hook
            n += 1
    return n
