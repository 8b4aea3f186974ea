"""What the FLUX.2 family hands the core: transformer + autoencoder + text encoder as a ModelBundle.

The sampler's latent is the normalised, patchified one laid out as an image, (128, H/16, W/16):
each position is one transformer token, so ``seq_len`` counts positions and ``forward`` only
packs, adds the position ids and unpacks.

The request's images, as the generate job loads them:

- ``reference_images``: a list of (3, H, W) in [-1, 1]; editing appends their tokens at
  t = 10, 20, ... (pixel caps and crops: ``diffcore_flux2.images``).
- ``image`` + ``mask`` ((1, H, W) in [0, 1], 1 = repaint): inpainting with the normal model.
  FLUX.2 has no control variant: a ``control_image`` is an error.
  As in diffusers' ``Flux2KleinInpaintPipeline`` the image is also the first reference, and
  the kept region is held to it by ``sampling.keep_known`` inside ``forward``. The channel-concat
  Fill checkpoint is FLUX.1's; FLUX.2 has none.

img2img (``init_image`` + ``strength`` in the job) goes through ``image_shape`` and ``encode``.

Training (the ``ModelBundle`` contract): ``encode`` gives what the flow objective noises (the
posterior mean, patchified and normalised by the autoencoder's batch-norm statistics, as
diffusers' train_dreambooth_lora_flux2 scripts feed their transformer); ``encode_captions`` the
stacked hidden states ``txt``; position ids need no inputs (``forward`` makes them from the latent
grid and the text length). The autoencoder and text encoder of a bundle built from files load on
first use, so a run on cached latents and text never reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from diffcore.api import ConfigError, GenerationRequest, LazyComponent, ModelBundle, module_fingerprint
from diffcore_flux2.images import (
    inpaint_size,
    prepare_reference,
    reference_cap,
    reference_size,
    resize,
    token_mask,
)
from diffcore_flux2.model import ReferenceCache, attention_alias
from diffcore_flux2.sampling import get_schedule, image_ids, keep_known, pack, reference_tokens, text_ids, unpack
from diffcore_flux2.text import Flux2TextEncoder
from diffcore_flux2.convert import diffusers_modules
from diffcore_flux2.training import LORA_PRESETS
from diffcore_flux2.vae import AutoEncoder


@attrs.define(eq=False)
class Flux2Bundle(ModelBundle):
    """``network`` is a ``Flux2``. ``guidance``: dev's embedded guidance (klein has none);
    ``default_cfg_scale``: the CFG scale the generate job uses when the job sets none (4.0 for
    klein-base, 1.0, one forward, otherwise); ``reference_max_pixels``: None for BFL's caps
    (2024^2 for one reference, 1024^2 each for several), or one cap for all (diffusers: 1024^2);
    ``reference_cache``: klein-9b-kv's editing, where the references run through the model on the
    first step only (their keys and values are kept in a ``ReferenceCache`` per branch);
    ``train_guidance``: the embedded guidance dev trains at (klein embeds none)."""

    _vae: AutoEncoder | None = None            # init argument ``vae``
    _text: Flux2TextEncoder | None = None      # init argument ``text``
    guidance: float = 4.0
    default_cfg_scale: float = 1.0
    default_size: int = 1024
    reference_max_pixels: int | None = None
    reference_cache: bool = False
    train_guidance: float = 1.0
    vae_downscale: int = 16                    # pixels per token, known before the autoencoder loads

    lora_presets: ClassVar[dict[str, list[str]]] = LORA_PRESETS

    vae = LazyComponent()
    text = LazyComponent()

    def forward(self, x: Tensor, sigma: Tensor, txt: Tensor | None = None, guidance: Tensor | None = None,
                ref: Tensor | None = None, ref_ids: Tensor | None = None, known: Tensor | None = None,
                known_mask: Tensor | None = None, ref_cache: ReferenceCache | None = None) -> Tensor:
        if txt is None:
            raise ConfigError("FLUX.2 needs text conditioning: txt, the stacked LLM hidden states")
        _, _, h, w = x.shape
        dtype = self.network.img_in.weight.dtype
        out = self.network(pack(x), image_ids(h, w, device=x.device), sigma, txt.to(dtype),
                           text_ids(txt.shape[1], device=x.device), guidance=guidance, ref=ref, ref_ids=ref_ids,
                           ref_cache=ref_cache)
        v = unpack(out, h, w)
        if known is not None:
            v = keep_known(v, x, sigma, known, known_mask)
        return v

    def conditions(self, request: GenerationRequest) -> dict[str, dict[str, Any]]:
        """``cond`` from the prompts and ``uncond`` from the negative prompts ("" by default, as
        klein-base's CFG uses), or ``txt`` per branch from ``request.embeddings``; each with the
        embedded guidance, the reference tokens and, for inpainting, the encoded image
        (``known``) and the token mask (``known_mask``)."""
        if request.control_image is not None:
            raise ConfigError("FLUX.2 has no control variant; inpainting needs both image (what to repaint) and "
                              "mask (white = repaint)", path="job.mask")
        branches = self._branch_text(request)
        device = self.network.img_in.weight.device
        batch = branches["cond"].shape[0]
        shared: dict[str, Tensor] = {}
        if self.network.params.guidance_embed:
            shared["guidance"] = torch.full((batch,), self.guidance, device=device)

        image, mask = request.image, request.mask
        if (image is None) != (mask is None):
            raise ConfigError("inpainting needs both image (what to repaint) and mask (white = repaint)",
                              path="job.mask" if mask is None else "job.image")
        references = list(request.reference_images)
        latents = self.reference_latents(references, others=int(image is not None))
        if image is not None:
            height, width = self.image_size(request)
            known = self.encode(resize(image, height, width)[None].to(device))
            f = self.downscale
            shared["known"] = known.expand(batch, -1, -1, -1)
            shared["known_mask"] = token_mask(mask.to(device), height, width, height // f, width // f).expand(
                batch, -1, -1, -1)
            latents.insert(0, known)
        if latents:
            ref, ref_ids = reference_tokens(latents)
            shared["ref"] = ref[None].to(self.network.img_in.weight).expand(batch, -1, -1)
            shared["ref_ids"] = ref_ids[None].to(device).expand(batch, -1, -1)
        conditions = {key: {"txt": txt.to(device), **shared} for key, txt in branches.items()}
        if self.reference_cache and "ref" in shared:  # klein-9b-kv: each branch fills its own on its first step
            for cond in conditions.values():
                cond["ref_cache"] = ReferenceCache()
        return conditions

    def _branch_text(self, request: GenerationRequest) -> dict[str, Tensor]:
        if request.embeddings is not None:
            if "cond" not in request.embeddings:
                raise ConfigError("precomputed embeddings need the 'cond' branch (txt)", path="embeddings")
            return {key: c["txt"] for key, c in request.embeddings.items()}
        prompts = request.prompts
        if not prompts:
            raise ConfigError("FLUX.2 is a text-to-image model: give a prompt", path="job.prompt")
        if self.text is None:
            raise ConfigError("this FLUX.2 bundle has no text encoder: set text_encoder to a local diffusers "
                              "FLUX.2 folder (text_encoder/, tokenizer/)", path="model.text_encoder")
        negatives = request.negative_prompts or [""] * len(prompts)
        txt = self.text.encode(list(prompts) + list(negatives))
        return {"cond": txt[:len(prompts)], "uncond": txt[len(prompts):]}

    def reference_latents(self, images: Sequence[Tensor], others: int = 0) -> list[Tensor]:
        """Reference pixels, each prepared (capped, cropped) and encoded -> latents (1, C, h, w).
        ``others``: references the model sees besides these (the image to repaint), which count
        towards BFL's one-or-several rule."""
        if not images:
            return []
        self._need_vae("reference images")
        cap = self.reference_max_pixels or reference_cap(len(images) + others)
        p = next(self.vae.parameters())
        return [self.encode(prepare_reference(img, cap, self.downscale, index=i)[None].to(p.device))
                for i, img in enumerate(images)]

    def image_size(self, request: GenerationRequest) -> tuple[int, int]:
        """Output (height, width) in pixels: the request's; where it gives none, the image to
        repaint's (capped at 1024^2, sides floored to multiples of 16, as diffusers), else the
        first reference's after its preparation (diffusers' editing), else ``default_size``."""
        f = self.downscale
        references = request.reference_images
        if request.image is not None:
            size = inpaint_size(*request.image.shape[-2:], f)
        elif references:
            cap = self.reference_max_pixels or reference_cap(len(references))
            size = reference_size(*references[0].shape[-2:], cap, f)
        else:
            size = (self.default_size, self.default_size)
        height = request.height or size[0]
        width = request.width or size[1]
        if height % f or width % f or not height or not width:
            raise ConfigError(f"FLUX.2 images must be positive multiples of {f} pixels on each side, got "
                              f"{width}x{height}", path="job.height" if height % f or not height else "job.width")
        return height, width

    @property
    def downscale(self) -> int:
        """Pixels per latent token along each side."""
        return self._vae.downscale if self._vae is not None else self.vae_downscale

    def latent_shape(self, request: GenerationRequest) -> tuple[int, int, int]:
        height, width = self.image_size(request)
        return (self.network.params.in_channels, height // self.downscale, width // self.downscale)

    def seq_len(self, request: GenerationRequest) -> int:
        """Image tokens: one per latent position."""
        height, width = self.image_size(request)
        return (height // self.downscale) * (width // self.downscale)

    def sequence_condition(self, cond: dict[str, Any]) -> Tensor | None:
        """The stacked LLM hidden states (FLUX.2 has no pooled text vector)."""
        return cond.get("txt")

    def image_shape(self, request: GenerationRequest) -> tuple[int, int, int]:
        return (3, *self.image_size(request))

    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> normalised patchified latents in float32 (the posterior mean)."""
        self._need_vae("img2img, editing and inpainting")
        return self.vae.encode(images.to(next(self.vae.parameters()))).float()

    def decode(self, latents: Tensor) -> Tensor:
        self._need_vae("decoding")
        return self.vae.decode(latents.to(next(self.vae.parameters()).dtype))

    def attention_alias(self, name: str) -> str:
        return attention_alias(name)

    # -- training ---------------------------------------------------------------------------------
    def training_tokens(self, latents: Tensor) -> int:
        """One token per latent position."""
        return latents.shape[-2] * latents.shape[-1]

    def encode_captions(self, captions: list[str]) -> dict[str, Tensor]:
        """``txt``: (B, max_length, 3 * hidden) float32 on the network's device; no mask (the
        transformer attends to every position, padding included, as BFL's and diffusers')."""
        if self.text is None:
            raise ConfigError("this FLUX.2 bundle has no text encoder: set text_encoders to a local diffusers "
                              "FLUX.2 folder (text_encoder/, tokenizer/), or cache the text embeddings",
                              path="model.text_encoders")
        return {"txt": self.text.encode(list(captions)).float().to(self.network.img_in.weight.device)}

    def encoder_identity(self) -> dict[str, str]:
        """Fingerprints of the files the autoencoder and text encoder load from (headers and the
        ends of every tensor, ``diffcore.api.fingerprint``), else of the modules' weights."""
        out = dict(self.identity)
        for name in ("vae", "text"):
            if name not in out and (self.loaded(name) or name in self.loaders):
                module = getattr(self, name)
                extra = (module.spec, module.max_length) if name == "text" else ()
                out[name] = module_fingerprint(module, *extra)
        return out

    def training_inputs(self, batch: dict[str, Any], *, dropout: float = 0.0,
                        generator: torch.Generator | None = None) -> dict[str, Any]:
        """``txt`` from ``batch["text"]`` (a text cache) or the encoded ``batch["caption"]``, each
        sample's replaced by the empty prompt's with probability ``dropout`` (``empty_text``, or
        "" encoded once); dev's embedded ``guidance`` at ``train_guidance``. Position ids come
        from ``forward``: image ``[0, row, col, 0]``, text ``[0, 0, 0, l]``."""
        device = self.network.img_in.weight.device
        txt = self.caption_text(batch, device=device, dropout=dropout, generator=generator)["txt"]
        b = txt.shape[0]
        cond: dict[str, Any] = {"txt": txt}
        if self.network.params.guidance_embed:
            cond["guidance"] = torch.full((b,), self.train_guidance, device=device)
        return cond

    def diffusers_modules(self, modules: list[str]) -> list[tuple[str, str]]:
        return diffusers_modules(modules)

    def _need_vae(self, what: str) -> None:
        if self.vae is None:
            raise ConfigError(f"{what} needs FLUX.2's autoencoder: set vae to a local ae.safetensors or diffusers "
                              f"vae/ folder", path="model.vae")


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

