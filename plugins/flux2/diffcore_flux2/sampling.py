"""FLUX.2 sampling, after BFL flux2 ``sampling.py``: schedule, position ids, packing, Euler loops.

Sigma convention: ``x = (1 - sigma) x0 + sigma noise``, the model predicts ``noise - x0``, and one
Euler step is ``x += (sigma_next - sigma) v``. FLUX.2 shifts a uniform grid with
``compute_empirical_mu``, fitted by BFL to the image size and the number of steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from diffcore.api import time_shift
from diffcore_flux2.model import batched

REF_T_SCALE = 10  # reference image i sits at t = 10 * (i + 1)


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """BFL's fit of the shift mu: above 4300 tokens FLUX.1's line through (256, 0.5) and
    (4096, 1.15); below, linear in the step count through that line's value (taken as the
    200-step value) and a second line's (the 10-step value), extrapolated outside 10..200."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    slope = (m_200 - m_10) / 190.0
    intercept = m_200 - 200.0 * slope
    return float(slope * num_steps + intercept)


def get_schedule(num_steps: int, image_seq_len: int) -> list[float]:
    """``num_steps + 1`` sigmas from 1 down to 0, shifted by ``compute_empirical_mu`` through the
    core's ``time_shift``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    mu = compute_empirical_mu(image_seq_len, num_steps)
    return time_shift(mu, 1.0, torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)).tolist()


# -- tokens and position ids ----------------------------------------------------------------------
def image_ids(height: int, width: int, t: int = 0, device: torch.device | str | None = None) -> Tensor:
    """(height * width, 4) ids ``[t, row, col, 0]`` for a row-major token grid."""
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(height), torch.arange(width),
                                torch.arange(1)).to(device)


def text_ids(length: int, device: torch.device | str | None = None) -> Tensor:
    """(length, 4) ids ``[0, 0, 0, l]``: text tokens are told apart by their index alone."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids.to(device)


def pack(latents: Tensor) -> Tensor:
    """Patchified latents (B, C, h, w) -> tokens (B, h * w, C)."""
    return rearrange(latents, "b c h w -> b (h w) c")


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """Tokens (B, h * w, C) -> patchified latents (B, C, h, w)."""
    return rearrange(tokens, "b (h w) c -> b c h w", h=height, w=width)


def reference_tokens(latents: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Reference images (each (C, h, w) or (1, C, h, w), normalised patchified latents) -> tokens
    (N, C) and ids (N, 4), image ``i`` at ``t = 10 * (i + 1)``; sizes may differ."""
    if not latents:
        raise ValueError("reference_tokens needs at least one latent")
    tokens, ids = [], []
    for i, z in enumerate(latents):
        z = z.squeeze(0) if z.ndim == 4 else z
        if z.ndim != 3:
            raise ValueError(f"reference latent {i} has shape {tuple(z.shape)}; expected (C, h, w) or (1, C, h, w)")
        tokens.append(rearrange(z, "c h w -> (h w) c"))
        ids.append(image_ids(z.shape[1], z.shape[2], t=REF_T_SCALE * (i + 1), device=z.device))
    return torch.cat(tokens), torch.cat(ids)


def keep_known(v: Tensor, x: Tensor, sigma: Tensor, known: Tensor, mask: Tensor) -> Tensor:
    """Inpainting by latent blending, applied to the velocity ``v`` predicted at ``(x, sigma)``: the
    x0 estimate ``x - sigma v`` is replaced by ``known`` (the encoded image) where ``mask`` is 0
    and kept where it is 1; fractional mask values blend the two estimates.

    diffusers' ``Flux2KleinInpaintPipeline`` instead overwrites the kept region of the latents
    after every step with ``known`` noised to the next sigma by the initial noise. Where the mask
    is 0 or 1 both give the same trajectory, for any sampler that is exact when the x0 estimate is
    constant (Euler among them): from ``(1 - s) known + s noise`` with estimate ``known`` a step
    lands on ``(1 - s') known + s' noise``, and the last step on ``known`` itself. Only the
    fractional tokens along the mask's edge differ. Done here, it needs neither the noise nor
    the next sigma, so it works inside any sampler and guidance chain.
    """
    s = sigma.reshape(-1, *(1,) * (x.ndim - 1)).to(v)
    return mask * v + (1 - mask) * (x - known) / s


# -- Euler loops ----------------------------------------------------------------------------------
def denoise(model: nn.Module, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor,
            timesteps: Sequence[float], guidance: float | None = None, *,
            ref: Tensor | None = None, ref_ids: Tensor | None = None,
            callback: Callable[[dict[str, Any]], None] | None = None) -> Tensor:
    """Euler over ``timesteps`` with one forward per step; ``guidance`` is the embedded guidance
    scale (dev; distilled klein ignores it). Reference tokens ride along in every forward."""
    guidance_vec = None if guidance is None else torch.full((img.shape[0],), guidance, device=img.device,
                                                             dtype=img.dtype)
    for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        t_vec = torch.full((img.shape[0],), float(t_curr), dtype=img.dtype, device=img.device)
        pred = model(img, img_ids, t_vec, txt, txt_ids, guidance=guidance_vec, ref=ref, ref_ids=ref_ids)
        img = img + (float(t_prev) - float(t_curr)) * pred
        if callback is not None:
            callback({"i": i, "sigma": float(t_curr), "sigma_next": float(t_prev), "x": img, "pred": pred})
    return img


def denoise_cfg(model: nn.Module, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor,
                neg_txt: Tensor, neg_txt_ids: Tensor, timesteps: Sequence[float], cfg: float, *,
                ref: Tensor | None = None, ref_ids: Tensor | None = None,
                callback: Callable[[dict[str, Any]], None] | None = None) -> Tensor:
    """Euler with true classifier-free guidance (Ho & Salimans 2022) for klein-base:
    ``v = v_neg + cfg (v_pos - v_neg)``. Negative and positive run as one batch when their
    text lengths match (BFL pads both to 512), else as two forwards."""
    batch = img.shape[0]
    joint = neg_txt.shape[1] == txt.shape[1]
    if joint:
        txt_both = torch.cat([neg_txt, txt.to(neg_txt)])
        ids_both = torch.cat([batched(neg_txt_ids, batch), batched(txt_ids, batch)])
        img_ids_both = torch.cat([batched(img_ids, batch)] * 2)
        ref_both = None if ref is None else torch.cat([batched(ref, batch)] * 2)
        ref_ids_both = None if ref_ids is None else torch.cat([batched(ref_ids, batch)] * 2)
    for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        if joint:
            t_vec = torch.full((2 * batch,), float(t_curr), dtype=img.dtype, device=img.device)
            v_neg, v_pos = model(torch.cat([img, img]), img_ids_both, t_vec, txt_both, ids_both,
                                 ref=ref_both, ref_ids=ref_ids_both).chunk(2)
        else:
            t_vec = torch.full((batch,), float(t_curr), dtype=img.dtype, device=img.device)
            v_pos = model(img, img_ids, t_vec, txt, txt_ids, ref=ref, ref_ids=ref_ids)
            v_neg = model(img, img_ids, t_vec, neg_txt, neg_txt_ids, ref=ref, ref_ids=ref_ids)
        pred = v_neg + cfg * (v_pos - v_neg)
        img = img + (float(t_prev) - float(t_curr)) * pred
        if callback is not None:
            callback({"i": i, "sigma": float(t_curr), "sigma_next": float(t_prev), "x": img, "pred": pred})
    return img

