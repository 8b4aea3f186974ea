"""What the FLUX.2 family hands the core: transformer + autoencoder + text encoder as a ModelBundle.

The sampler's latent is the normalised, patchified one laid out as an image, (128, H/16, W/16):
each position is one transformer token, so a schedule's ``seq_len`` is the number of positions
and ``forward`` only packs, adds the position ids and unpacks. Reference images (editing) enter
as ``request.extra["reference_images"]``: pixel tensors (3, H, W) in [-1, 1], encoded once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor

from diffcore.errors import ConfigError
from diffcore.models import ModelBundle
from diffcore_flux2.model import attention_alias
from diffcore_flux2.sampling import get_schedule, image_ids, pack, reference_tokens, text_ids, unpack
from diffcore_flux2.text import Flux2TextEncoder
from diffcore_flux2.vae import AutoEncoder


@attrs.define(eq=False)
class Flux2Bundle(ModelBundle):
    """``network`` is a ``Flux2``; ``guidance`` is dev's embedded guidance (klein ignores it)."""

    vae: AutoEncoder | None = None
    text: Flux2TextEncoder | None = None
    guidance: float = 4.0
    default_size: int = 1024

    def forward(self, x: Tensor, sigma: Tensor, txt: Tensor | None = None, guidance: Tensor | None = None,
                ref: Tensor | None = None, ref_ids: Tensor | None = None) -> Tensor:
        if txt is None:
            raise ConfigError("FLUX.2 needs text conditioning: txt, the stacked LLM hidden states")
        _, _, h, w = x.shape
        dtype = self.network.img_in.weight.dtype
        out = self.network(pack(x), image_ids(h, w, device=x.device), sigma, txt.to(dtype),
                           text_ids(txt.shape[1], device=x.device), guidance=guidance, ref=ref, ref_ids=ref_ids)
        return unpack(out, h, w)

    def conditions(self, request: Any) -> dict[str, dict[str, Any]]:
        """``cond`` from the prompts and ``uncond`` from the negative prompts ("" by default, as
        klein-base's CFG uses), or precomputed ``txt`` (optionally ``uncond_txt``) from
        ``request.extra``; each with the embedded guidance and the reference tokens."""
        extra = _field(request, "extra") or {}
        if "txt" in extra:
            branches = {"cond": extra["txt"]}
            if "uncond_txt" in extra:
                branches["uncond"] = extra["uncond_txt"]
        else:
            prompts = _field(request, "prompts")
            if not prompts:
                raise ConfigError("FLUX.2 is a text-to-image model: give a prompt", path="job.prompt")
            if self.text is None:
                raise ConfigError("this FLUX.2 bundle has no text encoder: set text_encoder to a local diffusers "
                                  "FLUX.2 folder (text_encoder/, tokenizer/)", path="model.text_encoder")
            negatives = _field(request, "negative_prompts") or [""] * len(prompts)
            txt = self.text.encode(list(prompts) + list(negatives))
            branches = {"cond": txt[:len(prompts)], "uncond": txt[len(prompts):]}
        device = self.network.img_in.weight.device
        batch = branches["cond"].shape[0]
        shared: dict[str, Tensor] = {}
        if self.network.params.guidance_embed:
            shared["guidance"] = torch.full((batch,), self.guidance, device=device)
        if extra.get("reference_images"):
            ref, ref_ids = self.encode_references(extra["reference_images"])
            shared["ref"] = ref.expand(batch, -1, -1)
            shared["ref_ids"] = ref_ids.expand(batch, -1, -1)
        return {key: {"txt": txt.to(device), **shared} for key, txt in branches.items()}

    def encode_references(self, images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Pixel images (3, H, W) in [-1, 1], sides multiples of 16 -> tokens (1, N, 128), ids (1, N, 4)."""
        if self.vae is None:
            raise ConfigError("reference images need the autoencoder: set vae", path="model.vae")
        p, f = next(self.vae.parameters()), self.vae.downscale
        latents = []
        for i, img in enumerate(images):
            if img.ndim != 3 or img.shape[0] != 3 or img.shape[1] % f or img.shape[2] % f:
                raise ConfigError(f"reference image {i} has shape {tuple(img.shape)}; expected (3, H, W) with H and W "
                                  f"multiples of {f}", path="extra.reference_images")
            latents.append(self.vae.encode(img[None].to(p)))
        ref, ids = reference_tokens(latents)
        return ref[None].to(self.network.img_in.weight), ids[None].to(p.device)

    def latent_shape(self, request: Any) -> tuple[int, int, int]:
        per_token = self.vae.downscale if self.vae is not None else 16
        height = _field(request, "height") or self.default_size
        width = _field(request, "width") or self.default_size
        if height % per_token or width % per_token:
            raise ConfigError(f"FLUX.2 images must be multiples of {per_token} pixels on each side, got "
                              f"{width}x{height}", path="job.height" if height % per_token else "job.width")
        return (self.network.params.in_channels, height // per_token, width // per_token)

    def decode(self, latents: Tensor) -> Tensor:
        if self.vae is None:
            raise ConfigError("this FLUX.2 bundle has no autoencoder: set vae to a local ae.safetensors",
                              path="model.vae")
        return self.vae.decode(latents.to(next(self.vae.parameters()).dtype))

    def attention_alias(self, name: str) -> str:
        return attention_alias(name)


@attrs.frozen
class Flux2Timer:
    """The ``flux2`` schedule component: BFL's empirical-mu shift, which depends on the number of
    image tokens and of steps."""

    config: Any = None

    def sigmas(self, steps: int, *, seq_len: int | None = None) -> Tensor:
        if seq_len is None:
            raise ValueError("the flux2 schedule shifts with the image size: pass seq_len, the number of "
                             "latent tokens")
        return torch.tensor(get_schedule(steps, seq_len), dtype=torch.float32)


def _field(request: Any, name: str) -> Any:
    return request.get(name) if isinstance(request, Mapping) else getattr(request, name, None)
