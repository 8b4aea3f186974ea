"""What the SD3 family hands the core: MMDiT + autoencoder + text encoders as a ModelBundle.

The sampler's latent is the autoencoder's, (16, H/8, W/8), normalised as SD3 trains on it;
the MMDiT patchifies it itself, so ``forward`` passes it through. Conditioning is per branch
key (``cond``, ``uncond`` = the negative prompt, "" by default) in an ``SD3Conditions``, which
also answers skip-layer guidance's ``cond|skip=...`` keys.

Training (the ``ModelBundle`` contract): ``encode`` gives the normalised posterior mean the flow
objective noises; ``encode_captions`` the ``context`` / ``y`` a text cache stores. The
autoencoder and text encoders of a bundle built from files load on first use, so a run on cached
latents and text never reads them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from diffcore.api import ConfigError, GenerationRequest, LazyComponent, ModelBundle, module_fingerprint
from diffcore_sd3.guidance import SD3Conditions
from diffcore_sd3.model import attention_alias
from diffcore_sd3.text import SD3TextEncoder
from diffcore_sd3.convert import diffusers_modules
from diffcore_sd3.training import LORA_PRESETS

VAE_FACTOR = 8            # pixels per latent pixel, SD3's autoencoder (read from the loaded one)


@attrs.define(eq=False)
class SD3Bundle(ModelBundle):
    """``network`` is an ``MMDiT``; ``vae`` has ``encode(images) -> normalised latents`` and
    ``decode(latents) -> images``; ``dtype`` is the components' compute dtype."""

    _vae: Any = None                           # init argument ``vae``
    _text: SD3TextEncoder | None = None        # init argument ``text``
    default_cfg_scale: float = 3.5
    default_size: int = 1024
    dtype: torch.dtype = torch.float32
    device: torch.device = attrs.field(default=torch.device("cpu"), converter=torch.device)
    vae_factor: int = VAE_FACTOR               # the autoencoder's downsampling, known before it loads

    lora_presets: ClassVar[dict[str, list[str]]] = LORA_PRESETS

    vae = LazyComponent()
    text = LazyComponent()

    # -- the network ------------------------------------------------------------------------------
    def forward(self, x: Tensor, sigma: Tensor, context: Tensor | None = None, y: Tensor | None = None,
                skip_layers: Iterable[int] = ()) -> Tensor:
        """Velocity for latents ``x`` (B, 16, h, w); ``skip_layers``: joint blocks to leave out."""
        if context is None or y is None:
            raise ConfigError("SD3 needs text conditioning: context (CLIP ; T5 tokens) and y (pooled CLIP)")
        dtype = self.dtype
        out = self.network(x.to(dtype), sigma.to(dtype), context.to(dtype), y.to(dtype), skip_layers=skip_layers)
        return out.to(x.dtype)

    # -- conditioning -----------------------------------------------------------------------------
    def conditions(self, request: GenerationRequest) -> SD3Conditions:
        """``cond`` from the prompts, ``uncond`` from the negative prompts ("" by default: SD3's
        unconditional input is the empty prompt's encoding, not zeros), or ``context`` / ``y`` per
        branch from ``request.embeddings``."""
        for field in ("reference_images", "image", "mask", "control_image"):
            if getattr(request, field) not in (None, []):
                raise ConfigError(f"SD3 takes no {field.replace('_', ' ')} (it does text-to-image and, with "
                                  f"init_image, image-to-image)", path=f"job.{field}")
        if request.embeddings is not None:
            if "cond" not in request.embeddings:
                raise ConfigError("precomputed embeddings need the 'cond' branch (context and y)", path="embeddings")
            branches = {key: (c["context"], c["y"]) for key, c in request.embeddings.items()}
        else:
            prompts = request.prompts
            if not prompts:
                raise ConfigError("SD3 is a text-to-image model: give a prompt", path="job.prompt")
            negatives = request.negative_prompts or [""] * len(prompts)
            context, y = self.encode_text(list(prompts) + list(negatives))
            n = len(prompts)
            branches = {"cond": (context[:n], y[:n]), "uncond": (context[n:], y[n:])}
        return SD3Conditions({key: {"context": c.to(self.device), "y": y.to(self.device)}
                              for key, (c, y) in branches.items()})

    def sequence_condition(self, cond: dict[str, Any]) -> Tensor | None:
        """The [CLIP ; T5] tokens."""
        return cond.get("context")

    def pooled_condition(self, cond: dict[str, Any]) -> Tensor | None:
        """The pooled [CLIP-L | CLIP-G] embedding."""
        return cond.get("y")

    def encode_text(self, prompts: list[str], *, grad: bool = False) -> tuple[Tensor, Tensor]:
        if self.text is None:
            raise ConfigError("this SD3 bundle has no text encoders (a single transformer file was loaded): set "
                              "text_encoders to a local diffusers SD3 folder", path="model.text_encoders")
        return self.text.encode(prompts, device=self.device, grad=grad)

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """CLIP-L as ``text_encoder`` and CLIP-G as ``text_encoder_2`` (kohya's ``lora_te1_`` /
        ``lora_te2_``); T5 is left out, as diffusers' SD3 DreamBooth script leaves it."""
        return {} if self.text is None else {"text_encoder": self.text.clip_l, "text_encoder_2": self.text.clip_g}

    # -- shapes and the autoencoder ---------------------------------------------------------------
    @property
    def factor(self) -> int:
        return self._vae.factor if self._vae is not None else self.vae_factor

    @property
    def pixels(self) -> int:
        """Pixels per MMDiT token along a side: the autoencoder's factor times the 2 x 2 patch."""
        return self.factor * self.network.params.patch_size

    def size(self, request: GenerationRequest) -> tuple[int, int]:
        """The target's (height, width) in pixels: the request's, else ``default_size``."""
        height, width = request.height, request.width
        for side, value in (("height", height), ("width", width)):
            if value is not None and value % self.pixels:
                raise ConfigError(f"SD3 images must be multiples of {self.pixels} pixels on each side ({self.factor}x "
                                  f"autoencoder, 2 x 2 patches), got {width}x{height}", path=f"job.{side}")
        return height or self.default_size, width or self.default_size

    def latent_shape(self, request: GenerationRequest) -> tuple[int, int, int]:
        height, width = self.size(request)
        return (self.network.params.in_channels, height // self.factor, width // self.factor)

    def image_shape(self, request: GenerationRequest) -> tuple[int, int, int]:
        return (3, *self.size(request))

    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> normalised latents (img2img's x0), float32."""
        return self._need_vae().encode(images.to(self.device, self.dtype)).float()

    def decode(self, latents: Tensor) -> Tensor:
        return self._need_vae().decode(latents.to(self.device, self.dtype))

    def _need_vae(self) -> Any:
        if self.vae is None:
            raise ConfigError("this SD3 bundle has no autoencoder: set vae to SD3's (a diffusers vae/ folder or a "
                              "single file with first_stage_model.*)", path="model.vae")
        return self.vae

    def attention_alias(self, name: str) -> str:
        return attention_alias(name)

    # -- training ---------------------------------------------------------------------------------
    def training_tokens(self, latents: Tensor) -> int:
        """2x2 latent patches."""
        return latents.shape[-2] * latents.shape[-1] // 4

    def encode_captions(self, captions: list[str]) -> dict[str, Tensor]:
        """``context`` (B, 77 + max_length, width) and ``y`` (B, 768 + 1280), float32 on the bundle's device."""
        context, y = self.encode_text(list(captions), grad=self.train_text)
        return {"context": context.float(), "y": y.float()}

    def encoder_identity(self) -> dict[str, str]:
        """Fingerprints of the files the autoencoder and encoders load from (headers and the ends of every
        tensor, ``diffcore.api.fingerprint``), else of the modules' weights."""
        out = dict(self.identity)
        for name in ("vae", "text"):
            if name not in out and (self.loaded(name) or name in self.loaders):
                module = getattr(self, name)
                out[name] = module_fingerprint(module, *((module.max_length,) if name == "text" else ()))
        return out

    def training_inputs(self, batch: dict[str, Any], *, dropout: float = 0.0,
                        generator: torch.Generator | None = None) -> dict[str, Any]:
        """``context`` / ``y`` from ``batch["text"]`` (a text cache) or the encoded
        ``batch["caption"]``, each sample's replaced by the empty prompt's (the unconditional
        input SD3 samples with; ``empty_text``, or "" encoded once) with probability ``dropout``."""
        text = self.caption_text(batch, device=self.device, dropout=dropout, generator=generator)
        return {"context": text["context"], "y": text["y"]}

    def diffusers_modules(self, modules: list[str]) -> list[tuple[str, str]]:
        return diffusers_modules(modules)
