"""Training guidance models: supervised corrections or a differentiable reward on x0.

    trainer = GuidanceModelTrainer(model, lr=1e-3, max_grad_norm=1.0)
    trainer.train_step(img, pred, txt, vec, timestep, step_idx, target_correction=target)
    trainer.train_from_reward(img, pred, txt, vec, timestep, step_idx, reward_fn=reward,
                              to_denoised=lambda raw: x - sigma * raw)   # flow models
    trainer.save_checkpoint("checkpoints/step-000100")
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffcore.api import CheckpointError

from diffcore_guidance.models import BaseGuidanceModel, load_guidance_model, save_guidance_model

Tensor = torch.Tensor


def euler_with_grad(model: Any, x: Tensor, sigmas: Tensor, *, extra_args: Mapping[str, Any] | None = None,
                    callback: Callable[[dict[str, Any]], None] | None = None, disable: bool | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
    """Euler steps on the probability-flow ODE, ``dx/dsigma = (x - denoised) / sigma`` (the core's
    ``euler``) with autograd left on, so a loss on the final sample reaches a ``LearnedGuidance``
    model with ``requires_grad = True``: ``diffcore.api.sample(..., sampler=euler_with_grad)``."""
    extra_args = dict(extra_args or {})
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


class GuidanceModelTrainer:
    """One optimizer step per call, gradients clipped to ``max_grad_norm`` (0: no clipping).

    ``guidance_scale`` is the scale the model will be used at: the guided prediction is
    ``pred + guidance_scale * correction``. ``reg_weight`` adds ``reg_weight * mean(correction^2)``
    to reward training, which keeps the correction small where the reward does not care.
    """

    def __init__(self, model: BaseGuidanceModel, optimizer: torch.optim.Optimizer | None = None, *,
                 lr: float = 1e-4, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                 guidance_scale: float = 1.0, reg_weight: float = 0.0):
        self.model = model
        self.optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.max_grad_norm = max_grad_norm
        self.guidance_scale = guidance_scale
        self.reg_weight = reg_weight
        self.step = 0

    def _update(self, loss: Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])) if params else torch.zeros(())
        self.optimizer.step()
        self.step += 1
        return float(norm)

    def train_step(self, img: Tensor, pred: Tensor, txt: Tensor | None, vec: Tensor | None, timestep: Tensor,
                   step_idx: int | Tensor, target_correction: Tensor) -> dict[str, float]:
        """Regress the correction onto ``target_correction`` (mean squared error)."""
        self.model.train()
        correction = self.model(img, pred, txt, vec, timestep, step_idx)
        loss = F.mse_loss(correction.float(), target_correction.float())
        grad_norm = self._update(loss)
        return {"loss": loss.detach().item(), "grad_norm": grad_norm, "step": self.step}

    def train_from_reward(self, img: Tensor, pred: Tensor, txt: Tensor | None, vec: Tensor | None,
                          timestep: Tensor, step_idx: int | Tensor, reward_fn: Callable[..., Tensor], *,
                          to_denoised: Callable[[Tensor], Tensor], cond: Mapping[str, Any] | None = None,
                          num_guidance_steps: int = 0, guidance_lr: float = 0.1) -> dict[str, float]:
        """Raise ``reward_fn(x0, cond)`` of the predicted clean sample
        ``x0 = to_denoised(pred + guidance_scale * correction)``.

        ``num_guidance_steps = 0``: back-propagate the reward through ``to_denoised`` into the
        model (loss ``-mean(reward)``). ``> 0``: first find a better correction by that many steps of
        gradient ascent on the reward (step size ``guidance_lr``, starting from the model's own),
        then regress the model onto it; slower, but the model never sees the reward's gradient
        scale directly.
        """
        self.model.train()
        cond = cond or {}
        correction = self.model(img, pred, txt, vec, timestep, step_idx)
        reward = reward_fn(to_denoised(pred + self.guidance_scale * correction), cond)
        if num_guidance_steps <= 0:
            loss = -reward.mean()
            if self.reg_weight:
                loss = loss + self.reg_weight * correction.float().pow(2).mean()
        else:
            target = correction.detach().clone().requires_grad_(True)
            for _ in range(num_guidance_steps):
                score = reward_fn(to_denoised(pred + self.guidance_scale * target), cond).sum()
                (grad,) = torch.autograd.grad(score, target)
                target = (target + guidance_lr * grad).detach().requires_grad_(True)
            loss = F.mse_loss(correction.float(), target.detach().float())
        grad_norm = self._update(loss)
        return {"loss": loss.detach().item(), "avg_reward": reward.detach().mean().item(), "grad_norm": grad_norm,
                "step": self.step}

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, path: str | os.PathLike[str]) -> Path:
        """A folder with ``model.safetensors`` (weights + config), ``optimizer.pt`` and
        ``state.json``; written to ``<path>.tmp`` and renamed, so it is whole or absent."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_guidance_model(self.model, tmp / "model.safetensors")
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": self.step, "guidance_scale": self.guidance_scale}))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        return path

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore weights, optimizer state and step count from ``save_checkpoint``'s folder."""
        path = Path(path)
        if not (path / "state.json").is_file():
            raise CheckpointError(f"{path}: not a guidance trainer checkpoint (no state.json)")
        device = next(self.model.parameters()).device
        saved = load_guidance_model(path / "model.safetensors", device=device)
        self.model.load_state_dict(saved.state_dict())
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
        self.step = json.loads((path / "state.json").read_text())["step"]
