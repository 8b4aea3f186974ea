"""FLUX.1 sampling in BFL's functional form (``src/flux/sampling.py``): the resolution-shifted
schedule (the core's ``time_shift`` and ``dynamic_shift_mu``), position ids, and the Euler loop
over sigma with the transformer's velocity.

Flow matching: x_sigma = (1 - sigma) x0 + sigma noise; the model predicts v = noise - x0;
Euler: x <- x + (sigma_next - sigma) v. The diffcore engine does the same through
``ModelBundle``; these functions are the reference loop and what the family's tests pin.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import repeat
from torch import Tensor, nn

from diffcore.api import dynamic_shift_mu, time_shift


def get_schedule(num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
                 shift: bool = True) -> list[float]:
    """``num_steps + 1`` sigmas from 1 to 0. ``shift`` (dev, Kontext, Fill; off for schnell) moves
    them by mu = the line through (256 tokens, base_shift) and (4096, max_shift) at ``image_seq_len``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = dynamic_shift_mu(image_seq_len, base_shift=base_shift, max_shift=max_shift)
        timesteps = time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()


def prepare_img_ids(height: int, width: int, batch: int = 1, t: float = 0.0) -> Tensor:
    """(batch, height * width, 3) ids [t, row, col] for a grid of packed tokens (latent size / 2).
    Kontext's reference image uses the same grid with ``t = 1``."""
    ids = torch.zeros(height, width, 3)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return repeat(ids, "h w c -> b (h w) c", b=batch)


def prepare_txt_ids(length: int, batch: int = 1) -> Tensor:
    """(batch, length, 3) zeros: FLUX.1 text tokens carry no position (T5 already encodes order)."""
    return torch.zeros(batch, length, 3)


def prepare_kontext_ids(height: int, width: int, batch: int = 1) -> Tensor:
    """Ids of a Kontext reference image's tokens: the target's grid at t = 1."""
    return prepare_img_ids(height, width, batch, t=1.0)


def denoise(model: nn.Module, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, vec: Tensor,
            timesteps: list[float], guidance: float = 4.0, guidance_model: nn.Module | None = None,
            guidance_scale: float = 1.0, guidance_requires_grad: bool = False, *,
            img_cond: Tensor | None = None, img_cond_seq: Tensor | None = None,
            img_cond_seq_ids: Tensor | None = None,
            callback: Callable[[dict], None] | None = None) -> Tensor:
    """Euler from ``timesteps[0]`` to ``timesteps[-1]``; returns the final packed latents.

    - ``guidance``: the embedded guidance of distilled variants (ignored by schnell).
    - ``guidance_model``: a learned correction added to the velocity,
      ``v + guidance_scale * guidance_model(img=, pred=, txt=, vec=, timestep=, step_idx=)``;
      run under ``torch.no_grad`` unless ``guidance_requires_grad`` (to train a guidance model
      through the loop: call without ``no_grad`` and with the transformer's weights frozen).
    - ``img_cond``: channel-concatenated condition (Fill: 320 channels, Canny/Depth: 64).
    - ``img_cond_seq`` / ``img_cond_seq_ids``: Kontext reference tokens appended to the sequence;
      their outputs are dropped.
    - ``callback({"i", "sigma", "sigma_next", "x", "pred"})`` after each step.
    """
    if (img_cond_seq is None) != (img_cond_seq_ids is None):
        raise ValueError("img_cond_seq and img_cond_seq_ids go together")
    batch = img.shape[0]
    guidance_vec = torch.full((batch,), guidance, device=img.device, dtype=img.dtype)
    for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        t_vec = torch.full((batch,), t_curr, dtype=img.dtype, device=img.device)
        x, ids = img, img_ids
        if img_cond is not None:
            x = torch.cat((x, img_cond), dim=-1)
        if img_cond_seq is not None:
            x, ids = torch.cat((x, img_cond_seq), dim=1), torch.cat((ids, img_cond_seq_ids), dim=-2)
        pred = model(img=x, img_ids=ids, txt=txt, txt_ids=txt_ids, y=vec, timesteps=t_vec, guidance=guidance_vec)
        pred = pred[:, :img.shape[1]]
        if guidance_model is not None:
            with torch.set_grad_enabled(guidance_requires_grad and torch.is_grad_enabled()):
                correction = guidance_model(img=img, pred=pred, txt=txt, vec=vec, timestep=t_vec, step_idx=i)
            pred = pred + guidance_scale * correction
        img = img + (t_prev - t_curr) * pred
        if callback is not None:
            callback({"i": i, "sigma": t_curr, "sigma_next": t_prev, "x": img, "pred": pred})
    return img
