"""SDXL inpainting, as diffusers' ``StableDiffusionXLInpaintPipeline`` does it.

The mask (1, H, W), 1 = repaint, is binarised at 0.5 and brought to the latent grid by nearest
neighbour (diffusers' mask processor, then ``F.interpolate``).

- A 4-channel UNet (base, refiner, any finetune): latent blending. diffusers overwrites the kept
  region after every step with the encoded image re-noised to the next step's noise level by
  the run's noise (``scheduler.add_noise(image_latents, noise, t_next)``; the image itself after
  the last step). Here the same happens inside ``forward``: the x0 estimate of the kept region
  is replaced by the image, and an Euler step from ``image + sigma_i * noise`` lands on
  ``image + sigma_(i+1) * noise``: the very latents diffusers blends in. A run from pure noise
  (strength 1: the kept region is noise, not image + noise, on the first step) has its first
  estimate there set so that the Euler step lands on ``image + sigma_1 * noise`` all the same,
  which needs the next sigma: ``schedule_conditions`` tells it. With ``strength`` < 1 the run
  starts from the image noised to the first kept sigma (``init_image``), as diffusers' does.
- The 9-channel inpainting UNet (diffusers/stable-diffusion-xl-1.0-inpainting-0.1): its input is
  [noisy latents (scaled), the latent mask, the latents of the image with the repainted region
  zeroed (grey)], and no blending (diffusers blends only for 4-channel UNets).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffcore.api import ConfigError


def latent_mask(mask: Tensor, height: int, width: int, factor: int) -> Tensor:
    """(1, 1, height / factor, width / factor) binary mask from a (1, H, W) one in [0, 1]."""
    if mask.ndim != 3 or mask.shape[0] != 1:
        raise ConfigError(f"the mask is (1, height, width) in [0, 1], got {tuple(mask.shape)}", path="job.mask")
    m = mask[None].float()
    if tuple(m.shape[-2:]) != (height, width):
        m = F.interpolate(m, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    m = (m >= 0.5).to(m.dtype)
    return F.interpolate(m, size=(height // factor, width // factor)), m


def fit_image(image: Tensor, height: int, width: int) -> Tensor:
    """The image to repaint at the output size (bilinear, antialiased, when it differs)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ConfigError(f"the image to repaint is RGB (3, height, width), got {tuple(image.shape)}", path="job.image")
    if tuple(image.shape[-2:]) == (height, width):
        return image
    return F.interpolate(image[None].float(), size=(height, width), mode="bilinear", antialias=True,
                         align_corners=False)[0].clamp(-1, 1)


def inpaint_conditions(bundle: Any, request: Any, size: tuple[int, int], batch: int) -> dict[str, Any]:
    """What ``forward`` needs for inpainting, shared by every branch: ``known`` (the encoded
    image) and ``known_mask`` for the blending of 4-channel UNets; ``masked`` (the encoded image
    with the repainted region grey) for a 9-channel one; ``inpaint_fresh`` when the run starts
    from pure noise."""
    image, mask = _get(request, "image"), _get(request, "mask")
    if image is None or mask is None:
        raise ConfigError("inpainting needs both image (what to repaint) and mask (white = repaint)",
                          path="job.mask" if mask is None else "job.image")
    fresh = _get(request, "init_image") is None
    strength = _get(request, "strength")
    if fresh and strength is not None and strength < 1:
        raise ConfigError("inpainting with strength < 1 starts from the image noised: set init_image to the image "
                          "too (or strength = 1)", path="job.init_image")
    height, width = size
    device = next(bundle.network.parameters()).device
    image = fit_image(image, height, width).to(device)
    small, full = latent_mask(mask.to(device), height, width, bundle.latent_scale)
    out: dict[str, Any] = {"known_mask": small.expand(batch, -1, -1, -1)}
    experts = [bundle.network] + ([bundle.refiner.network] if bundle.refiner is not None else [])
    if any(net.params.in_channels == 4 for net in experts):
        out["known"] = bundle.encode(image[None]).expand(batch, -1, -1, -1)
        out["inpaint_fresh"] = fresh
    if bundle.network.params.in_channels == 9:
        out["masked"] = bundle.encode((image * (full[0] < 0.5))[None]).expand(batch, -1, -1, -1)
    elif bundle.network.params.in_channels != 4:
        raise ConfigError(f"this UNet takes {bundle.network.params.in_channels} input channels; SDXL inpainting "
                          f"needs 4 (latent blending) or 9 (an inpainting UNet)", path="model.path")
    return out


def first_step(conditions: dict[str, dict[str, Any]], times: Tensor, sigma_at: Any) -> dict[str, dict[str, Any]]:
    """A run from pure noise learns its first step's time and the next step's sigma (0 for a
    one-step run): ``inpaint_first = (t0, sigma1)``."""
    for cond in conditions.values():
        if cond.pop("inpaint_fresh", False):
            t = times.reshape(-1).double()
            cond["inpaint_first"] = (float(t[0]), float(sigma_at(t[1:2])[0]) if len(t) > 1 else 0.0)
        else:
            cond.pop("inpaint_first", None)
    return conditions


def blend(raw: Tensor, x_in: Tensor, t: Tensor, sigma: Tensor, known: Tensor, mask: Tensor, prediction_type: str,
          first: tuple[float, float] | None) -> Tensor:
    """``raw`` (epsilon or v at the network's input ``x_in`` = x / sqrt(sigma^2 + 1)) with the kept
    region (mask 0) replaced by the prediction whose x0 estimate is ``known`` (see the module)."""
    s = sigma.to(torch.float64).reshape(-1, 1, 1, 1)
    c = (s ** 2 + 1).sqrt()
    x = x_in.double() * c
    target = known.double()
    if first is not None:
        t0, s1 = first
        at_first = (t.double() - t0).abs().reshape(-1, 1, 1, 1) < 1e-4
        target = torch.where(at_first, target * s / (s - s1), target)
    if prediction_type == "v":
        pred = (x / (s ** 2 + 1) - target) * c / s
    else:
        pred = (x - target) / s
    return torch.where(mask >= 0.5, raw, pred.to(raw.dtype))


def _get(request: Any, key: str) -> Any:
    return request.get(key) if isinstance(request, dict) else getattr(request, key, None)
