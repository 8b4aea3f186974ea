"""Optimizers and the learning-rate schedule.

AdamW (Loshchilov & Hutter 2019) decays the weights of matrices and kernels only, not biases,
norms' gains or other vectors (as nanoGPT does). Muon (Jordan et al. 2024,
kellerjordan.github.io/posts/muon) orthogonalises the update of a 2-D matrix, so it takes the
weights of ``nn.Linear`` layers only: ``torch.optim.Muon`` refuses anything that is not 2-D, and
embedding tables, convolution kernels, biases and norms belong with AdamW (Keller Jordan's
advice). Its ``adjust_lr_fn="match_rms_adamw"`` (Liu et al. 2025, Moonlight, arXiv:2502.16982)
scales each matrix's step to AdamW's RMS, so one ``lr`` serves both optimizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from diffcore.errors import ConfigError


class Optimizers:
    """Several optimizers stepped, zeroed, saved and loaded as one (Muon + AdamW)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = [o for o in optimizers if o.param_groups]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"names": [type(o).__name__ for o in self.optimizers],
                "states": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [type(o).__name__ for o in self.optimizers]
        if state["names"] != names:
            raise ConfigError(f"the checkpoint's optimizer is {' + '.join(state['names'])}, this run uses "
                              f"{' + '.join(names)}; resume with the same optimizer", path="job.optimizer")
        for o, s in zip(self.optimizers, state["states"]):
            o.load_state_dict(s)


def build_optimizer(network: nn.Module, params: Iterable[nn.Parameter], name: str, *, lr: float,
                    weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                    lr_scale: Callable[[nn.Parameter], float] | None = None) -> Optimizers:
    """``adamw`` for everything, or ``muon`` for ``nn.Linear`` weights plus AdamW for the rest.
    ``lr_scale(p)``: the ratio of ``p``'s learning rate to ``lr`` (a text encoder's own rate); the
    parameters of each ratio go in their own groups, which carry it as ``lr_scale``."""
    params = [p for p in params if p.requires_grad]
    matrices: list[nn.Parameter] = []
    if name == "muon":
        if not hasattr(torch.optim, "Muon"):
            raise ConfigError(f"optimizer = \"muon\" needs torch.optim.Muon (torch >= 2.9); this is torch "
                              f"{torch.__version__}", path="job.optimizer")
        linear = {id(m.weight) for m in network.modules() if isinstance(m, nn.Linear)}
        matrices = [p for p in params if id(p) in linear]
    elif name not in ("adamw", "adamw8bit"):
        raise ConfigError(f"unknown optimizer {name!r}; expected adamw, adamw8bit or muon", path="job.optimizer")
    taken = {id(p) for p in matrices}
    rest = [p for p in params if id(p) not in taken]
    groups = [g for scale, mine in _by_scale(rest, lr_scale)
              for g in ({"params": [p for p in mine if p.ndim >= 2], "weight_decay": weight_decay, **scale},
                        {"params": [p for p in mine if p.ndim < 2], "weight_decay": 0.0, **scale})
              if g["params"]]
    if name == "adamw8bit":
        return Optimizers(adamw_8bit(groups, lr=lr, betas=betas))
    # CUDA: torch's fused kernel (one launch for every tensor); elsewhere the default implementation
    fused = bool(rest) and all(p.device.type == "cuda" for p in rest)
    adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused else {}))
    if not matrices:
        return Optimizers(adamw)
    muon = torch.optim.Muon([{"params": mine, **scale} for scale, mine in _by_scale(matrices, lr_scale)], lr=lr,
                            weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
    return Optimizers(muon, adamw)


def _by_scale(params: list[nn.Parameter], lr_scale: Callable[[nn.Parameter], float] | None
              ) -> list[tuple[dict[str, float], list[nn.Parameter]]]:
    """``params`` split by their learning-rate ratio, each part with the group entry carrying it
    (none when no ratio is given: groups stay as plain as before)."""
    if lr_scale is None:
        return [({}, params)] if params else []
    scales = [float(lr_scale(p)) for p in params]
    return [({"lr_scale": k}, [p for p, q in zip(params, scales) if q == k]) for k in dict.fromkeys(scales)]


def adamw_8bit(groups: list[dict[str, Any]], *, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW with 8-bit block-quantised moments (Dettmers et al. 2022, arXiv:2110.02861):
    2 bytes of state per parameter instead of 8. CUDA only."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("optimizer = \"adamw8bit\" needs bitsandbytes (pip install bitsandbytes) and a CUDA "
                          "device", path="job.optimizer") from None
    if any(p.device.type != "cuda" for g in groups for p in g["params"]):
        raise ConfigError("optimizer = \"adamw8bit\" runs on CUDA only; use adamw on this device", path="job.optimizer")
    return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas)


def lr_at(step: int, *, lr: float, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up to ``lr`` over
    ``warmup_steps``, then constant, or a cosine (Loshchilov & Hutter 2017) down to 0 at ``total_steps``.
    A pure function of the step, so resuming needs nothing but the step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ConfigError(f"unknown lr_schedule {schedule!r}; expected constant or cosine", path="job.lr_schedule")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
