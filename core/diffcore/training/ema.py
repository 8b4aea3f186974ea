"""Exponential moving average of the trained weights, the weights used for sampling.

After each optimizer step every tracked parameter's shadow moves toward it:

    shadow <- d_n * shadow + (1 - d_n) * param,   d_n = min(decay, (1 + n) / (10 + n))  (warm-up)
                                                  d_n = decay                           (no warm-up)

where ``n`` counts the updates made before this one (0 at the first). The warm-up is
TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` rule: early on the average follows
the fast-changing weights instead of remembering the random initialisation for ~1/(1-decay)
steps. Shadows are kept in float32 whatever the parameters' dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from diffcore.errors import CheckpointError


class EMA:
    """Shadows of ``module``'s trainable parameters, keyed by parameter name."""

    def __init__(self, module: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), found {decay}")
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in module.named_parameters() if p.requires_grad}

    def decay_at(self, n: int) -> float:
        """The decay used by update number ``n`` (counting from 0)."""
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = self.decay_at(self.num_updates)
        pairs = [(self.shadow[name], p.detach()) for name, p in module.named_parameters() if name in self.shadow]
        if pairs:  # one fused kernel over all tensors instead of a Python loop per parameter
            shadows, params = zip(*pairs)
            torch._foreach_lerp_(list(shadows), [p.float() for p in params], 1 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        params = dict(module.named_parameters())
        for name, value in self.shadow.items():
            params[name].copy_(value)

    @contextlib.contextmanager
    def applied(self, module: nn.Module) -> Iterator[nn.Module]:
        """Within the block ``module`` holds the averaged weights; its own come back afterwards."""
        params = dict(module.named_parameters())
        saved = {name: params[name].detach().clone() for name in self.shadow}
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Shadows by parameter name (what ``ema.safetensors`` holds); counters go in ``counters``."""
        return dict(self.shadow)

    def counters(self) -> dict[str, float | int | bool]:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates}

    def load_state_dict(self, shadow: dict[str, torch.Tensor], counters: dict | None = None) -> None:
        missing, unexpected = set(self.shadow) - set(shadow), set(shadow) - set(self.shadow)
        if missing or unexpected:
            raise CheckpointError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
        for name, value in shadow.items():
            self.shadow[name].copy_(value)
        if counters is not None:
            self.num_updates = int(counters["num_updates"])
