"""Built-in rewards: differentiable scores of the predicted clean sample, ``reward(x0, cond) -> (B,)``.

``x0`` is what the sampler works in (pixels for DiT, latents for FLUX); ``cond`` the ``cond``
branch's conditioning kwargs (class labels under ``y`` for DiT). Higher is better.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from diffcore.api import CheckpointError, ConfigError

Reward = Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]


def _mean(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).mean(1)


def in_range(limit: float = 1.0) -> Reward:
    def reward(x0: torch.Tensor, cond: Mapping[str, Any] | None = None) -> torch.Tensor:
        return -_mean(F.relu(x0.abs() - limit) ** 2)

    return reward


def total_variation(weight: float = 1.0) -> Reward:
    def reward(x0: torch.Tensor, cond: Mapping[str, Any] | None = None) -> torch.Tensor:
        if x0.ndim < 3:
            raise ValueError(f"total variation needs spatial samples (B, C, H, W), got {tuple(x0.shape)}")
        dh = (x0[..., 1:, :] - x0[..., :-1, :]).abs().flatten(1).mean(1)
        dw = (x0[..., :, 1:] - x0[..., :, :-1]).abs().flatten(1).mean(1)
        return weight * (dh + dw)

    return reward


def mean_target(target: float = 0.0) -> Reward:
    def reward(x0: torch.Tensor, cond: Mapping[str, Any] | None = None) -> torch.Tensor:
        return -(_mean(x0) - target) ** 2

    return reward


def classifier(module: torch.nn.Module, label_key: str = "y") -> Reward:
    """``log p(label | x0)`` under ``module`` (logits out); the label comes from ``cond[label_key]``."""
    if isinstance(module, torch.nn.Module) and not isinstance(module, torch.fx.GraphModule):
        module.eval()   # an exported program's module has no train/eval switch
    for p in module.parameters():
        p.requires_grad_(False)

    def reward(x0: torch.Tensor, cond: Mapping[str, Any] | None = None) -> torch.Tensor:
        labels = (cond or {}).get(label_key)
        if labels is None:
            raise ConfigError(f"the classifier reward needs class labels in the conditioning key {label_key!r}")
        logits = module(x0)
        labels = labels.reshape(-1).long().to(logits.device)
        valid = labels < logits.shape[-1]            # the null class (unconditional samples) scores 0
        logp = F.log_softmax(logits.float(), -1).gather(1, labels.clamp(max=logits.shape[-1] - 1)[:, None])[:, 0]
        return torch.where(valid, logp, torch.zeros_like(logp))

    return reward


def build(name: str, config: Any, **kwargs: Any) -> Reward:
    """The reward ``name`` from its config (``diffcore_guidance.config``); ``classifier`` also takes
    ``module=`` to use an in-memory network instead of ``config.path``."""
    if name == "in-range":
        return in_range(config.limit)
    if name == "total-variation":
        return total_variation(config.weight)
    if name == "mean-target":
        return mean_target(config.target)
    if name == "classifier":
        module = kwargs.get("module")
        if module is None:
            try:
                module = torch.export.load(config.path).module()
            except Exception as exc:   # torch.export raises several kinds on a bad or missing file
                raise CheckpointError(f"{config.path}: cannot load an exported classifier ({exc}); save one with "
                                      f"torch.export.save(torch.export.export(net, (x,), dynamic_shapes=...), path)") from None
        return classifier(module, config.label_key)
    raise ConfigError(f"unknown built-in reward {name!r}")
