"""What the FLUX.1 family hands the core: transformer + autoencoder + text encoders as a ModelBundle.

The sampler's latent is the packed one laid out as an image, (64, H/16, W/16) for FLUX.1's
8x autoencoder: each position is one transformer token (16 channels x 2 x 2, in (c, ph, pw)
order), so a schedule's ``seq_len`` is the number of positions, and ``forward`` only flattens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch
from einops import rearrange

from diffcore.errors import ConfigError
from diffcore.models import ModelBundle
from diffcore_flux1.model import attention_alias
from diffcore_flux1.sampling import prepare_img_ids
from diffcore_flux1.text import FluxTextEncoder
from diffcore_flux1.vae import AutoEncoder

TILE_LATENT = 128  # decode larger latents (2048 px sides at 8x) in overlapping tiles


@attrs.define(eq=False)
class FluxBundle(ModelBundle):
    """``network`` is a ``Flux``; ``guidance`` is the embedded guidance of distilled variants."""

    vae: AutoEncoder | None = None
    text: FluxTextEncoder | None = None
    guidance: float = 3.5
    default_size: int = 1024

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, txt: torch.Tensor | None = None,
                vec: torch.Tensor | None = None, guidance: torch.Tensor | None = None) -> torch.Tensor:
        if txt is None or vec is None:
            raise ConfigError("FLUX.1 needs text conditioning: txt (T5 tokens) and vec (pooled CLIP)")
        b, _, h, w = x.shape
        img_ids = prepare_img_ids(h, w).to(device=x.device, dtype=x.dtype)
        txt_ids = torch.zeros(1, txt.shape[1], 3, device=x.device, dtype=x.dtype)
        if guidance is None:
            guidance = torch.full((b,), self.guidance, device=x.device, dtype=x.dtype)
        tokens = rearrange(x, "b c h w -> b (h w) c")
        out = self.network(tokens, img_ids, txt.to(x.dtype), txt_ids, sigma.to(x.dtype), vec.to(x.dtype),
                           guidance.to(x.dtype))
        return rearrange(out, "b (h w) c -> b c h w", h=h, w=w)

    def conditions(self, request: Any) -> dict[str, dict[str, Any]]:
        """``cond`` from the prompts, ``uncond`` from the negative prompts ("" by default), both
        with the embedded guidance; or precomputed ``txt`` / ``vec`` (and optionally
        ``uncond_txt`` / ``uncond_vec``) from ``request.extra``."""
        extra = getattr(request, "extra", None) or {}
        if "txt" in extra and "vec" in extra:
            branches = {"cond": {"txt": extra["txt"], "vec": extra["vec"]}}
            if "uncond_txt" in extra and "uncond_vec" in extra:
                branches["uncond"] = {"txt": extra["uncond_txt"], "vec": extra["uncond_vec"]}
        else:
            prompts = _field(request, "prompts")
            if not prompts:
                raise ConfigError("FLUX.1 is a text-to-image model: give a prompt", path="job.prompt")
            if self.text is None:
                raise ConfigError("this FLUX.1 bundle has no text encoders (a single transformer file was "
                                  "loaded): set text_encoders to a local diffusers FLUX.1 folder", path="model")
            negatives = _field(request, "negative_prompts") or [""] * len(prompts)
            txt, vec = self.text.encode(list(prompts) + list(negatives))
            n = len(prompts)
            branches = {"cond": {"txt": txt[:n], "vec": vec[:n]}, "uncond": {"txt": txt[n:], "vec": vec[n:]}}
        device = next(self.network.parameters()).device
        g = torch.full((branches["cond"]["txt"].shape[0],), self.guidance, device=device)
        return {key: {"txt": c["txt"].to(device), "vec": c["vec"].to(device), "guidance": g}
                for key, c in branches.items()}

    def latent_shape(self, request: Any) -> tuple[int, int, int]:
        per_token = 2 * (self.vae.factor if self.vae is not None else 8)
        height = _field(request, "height") or self.default_size
        width = _field(request, "width") or self.default_size
        if height % per_token or width % per_token:
            raise ConfigError(f"FLUX.1 images must be multiples of {per_token} pixels on each side, got "
                              f"{width}x{height}", path="job.height" if height % per_token else "job.width")
        return (self.network.params.out_channels, height // per_token, width // per_token)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise ConfigError("this FLUX.1 bundle has no autoencoder: set vae to a local ae.safetensors", path="model")
        z = rearrange(latents, "b (c ph pw) h w -> b c (h ph) (w pw)", ph=2, pw=2)
        z = z.to(next(self.vae.parameters()).dtype)
        if max(z.shape[-2:]) > TILE_LATENT:
            return self.vae.decode_tiled(z, tile=TILE_LATENT // 2, overlap=TILE_LATENT // 8)
        return self.vae.decode(z)

    def attention_alias(self, name: str) -> str:
        return attention_alias(name)


def _field(request: Any, name: str) -> Any:
    return request.get(name) if isinstance(request, Mapping) else getattr(request, name, None)
