"""What the FLUX.1 family hands the core: transformer + autoencoder + text encoders as a ModelBundle.

The sampler's latent is the packed one laid out as an image, (64, H/16, W/16) for FLUX.1's
8x autoencoder: each position is one transformer token (16 channels x 2 x 2, in (c, ph, pw)
order), so ``forward`` only flattens and ``seq_len`` counts positions. (The layout fixes which
noise a seed gives, so it stays as it was when the token count was still read from it.)

The request's images (pixel tensors in [-1, 1]) become conditioning once per request
(``diffcore_flux1.images``): ``reference_images`` -> Kontext tokens (``ref``, ``ref_ids``);
``image`` + ``mask`` -> Fill's 320 extra channels, ``control_image`` -> Canny / Depth's 64
(``img_cond``). Which applies follows from the transformer's input channels (64, 128 or 384).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import attrs
import torch
from einops import rearrange
from torch import Tensor

from diffcore.api import ConfigError, GenerationRequest, LazyComponent, ModelBundle
from diffcore_flux1.convert import diffusers_modules
from diffcore_flux1.controlnet import (FluxControl, control_conditions, new_controlnet, schedule_controls,
                                       training_controls)
from diffcore_flux1.images import fill_condition, fit, kontext_size, token_multiple
from diffcore_flux1.model import attention_alias
from diffcore_flux1.offload import Offload
from diffcore_flux1.sampling import prepare_img_ids, prepare_kontext_ids
from diffcore_flux1.text import FluxTextEncoder
from diffcore_flux1.vae import AutoEncoder, pack

# LoRA target presets over ``Flux.named_modules()``: ``attention`` is each stream's fused qkv and
# output projection and the single blocks' linear1 (q, k, v fused with the MLP's input: the only
# way into their attention); ``attention-mlp`` adds both streams' MLPs and linear2 (diffusers'
# train_dreambooth_lora_flux default set, with the single blocks' MLP); ``all-linear`` every linear
# layer, the modulations and embedders too.
_ATTENTION = ["double_blocks.*.img_attn.qkv", "double_blocks.*.img_attn.proj", "double_blocks.*.txt_attn.qkv",
              "double_blocks.*.txt_attn.proj", "single_blocks.*.linear1"]
LORA_PRESETS = {
    "attention": _ATTENTION,
    "attention-mlp": [*_ATTENTION, "double_blocks.*.img_mlp.*", "double_blocks.*.txt_mlp.*", "single_blocks.*.linear2"],
    "all-linear": ["*"],
}
TILE_LATENT = 128  # decode larger latents (2048 px sides at 8x) in overlapping tiles


@attrs.define(eq=False)
class FluxBundle(ModelBundle):
    """``network`` is a ``Flux``; ``guidance`` is the embedded guidance of distilled variants;
    ``offload`` places the components (``diffcore_flux1.offload``) and knows the device;
    ``dtype`` is the components' compute dtype; ``resize_references`` snaps Kontext reference
    images to the nearest training resolution, as BFL and diffusers do; ``train_guidance``: the
    embedded guidance a guidance-distilled variant trains at (kohya's and diffusers' default 3.5).
    The autoencoder and text encoders of a bundle built from files load on first use."""

    _vae: AutoEncoder | None = None            # init argument ``vae``
    _text: FluxTextEncoder | None = None       # init argument ``text``
    guidance: float = 3.5
    train_guidance: float = 3.5
    default_size: int = 1024
    offload: Offload = attrs.Factory(Offload)
    dtype: torch.dtype = torch.float32
    resize_references: bool = True
    controlnets: dict[str, Any] = attrs.Factory(dict)   # loaded for [[control]] tables, by path
    takes_controls: ClassVar[bool] = True
    lora_presets: ClassVar[dict[str, list[str]]] = LORA_PRESETS

    vae = LazyComponent()
    text = LazyComponent()

    @property
    def device(self) -> torch.device:
        return self.offload.device

    @property
    def pixels_per_token(self) -> int:
        """16 for FLUX.1: the autoencoder's 8x, then 2x2 packing."""
        return 2 * (self.vae.factor if self.vae is not None else 8)

    # -- the network ------------------------------------------------------------------------------
    def forward(self, x: Tensor, sigma: Tensor, txt: Tensor | None = None, vec: Tensor | None = None,
                guidance: Tensor | None = None, img_cond: Tensor | None = None, ref: Tensor | None = None,
                ref_ids: Tensor | None = None, control: Sequence[FluxControl] = ()) -> Tensor:
        """Velocity for packed latents ``x`` (B, C, h, w). ``img_cond`` (B, h * w, C') joins the
        channels (Fill, Canny, Depth); ``ref`` (B, N, C) with ``ref_ids`` (B, N, 3) joins the
        sequence (Kontext) and its outputs are dropped."""
        if txt is None or vec is None:
            raise ConfigError("FLUX.1 needs text conditioning: txt (T5 tokens) and vec (pooled CLIP)")
        if (ref is None) != (ref_ids is None):
            raise ConfigError("Kontext reference tokens need their position ids: pass ref and ref_ids together")
        self.offload.use("network")
        b, _, h, w = x.shape
        dtype, device = self.dtype, x.device
        tokens = rearrange(x, "b c h w -> b (h w) c").to(dtype)
        img_ids = prepare_img_ids(h, w).to(device)
        if img_cond is not None:
            tokens = torch.cat((tokens, img_cond.to(dtype)), dim=-1)
        if ref is not None:
            tokens = torch.cat((tokens, ref.to(dtype)), dim=1)
            img_ids = torch.cat((img_ids.expand(b, -1, -1), ref_ids.to(img_ids)), dim=1)
        if guidance is None:
            guidance = torch.full((b,), self.guidance, device=device)
        txt_ids = torch.zeros(1, txt.shape[1], 3, device=device)
        txt, vec, sigma, guidance = txt.to(dtype), vec.to(dtype), sigma.to(dtype), guidance.to(dtype)
        residuals = [r for c in control if (r := c(tokens, img_ids, txt, txt_ids, sigma, vec, guidance)) is not None]
        out = self.network(tokens, img_ids, txt, txt_ids, sigma, vec, guidance, control=residuals)
        return rearrange(out[:, :h * w], "b (h w) c -> b c h w", h=h, w=w).to(x.dtype)

    # -- conditioning -----------------------------------------------------------------------------
    def conditions(self, request: GenerationRequest) -> dict[str, dict[str, Any]]:
        """``cond`` from the prompts, ``uncond`` from the negative prompts ("" by default; true
        CFG when the job's ``cfg_scale`` > 1), or ``txt`` / ``vec`` per branch from
        ``request.embeddings``. Both branches carry the embedded guidance and the image conditioning."""
        if request.embeddings is not None:
            if "cond" not in request.embeddings:
                raise ConfigError("precomputed embeddings need the 'cond' branch (txt and vec)", path="embeddings")
            branches = {key: (c["txt"], c["vec"]) for key, c in request.embeddings.items()}
        else:
            prompts = request.prompts
            if not prompts:
                raise ConfigError("FLUX.1 is a text-to-image model: give a prompt", path="job.prompt")
            if self.text is None:
                raise ConfigError("this FLUX.1 bundle has no text encoders (a single transformer file was "
                                  "loaded): set text_encoders to a local diffusers FLUX.1 folder", path="model")
            negatives = request.negative_prompts or [""] * len(prompts)
            self.offload.use("text")
            txt, vec = self.text.encode(list(prompts) + list(negatives), device=self.device)
            n = len(prompts)
            branches = {"cond": (txt[:n], vec[:n]), "uncond": (txt[n:], vec[n:])}
        batch = branches["cond"][0].shape[0]
        shared = {"guidance": torch.full((batch,), self.guidance, device=self.device),
                  **self.image_conditions(request, batch), **control_conditions(self, request)}
        return {key: {"txt": txt.to(self.device), "vec": vec.to(self.device), **shared}
                for key, (txt, vec) in branches.items()}

    def new_controlnet(self, **options: Any) -> torch.nn.Module:
        return new_controlnet(self, **options)

    def control_inputs(self, controlnet: torch.nn.Module, image: Tensor, *, scale: float = 1.0) -> dict[str, Any]:
        return training_controls(self, controlnet, image, scale)

    def schedule_conditions(self, conditions: dict[str, dict[str, Any]], times: Tensor) -> dict[str, dict[str, Any]]:
        """ControlNets learn the schedule's times, for their start / end."""
        return schedule_controls(conditions, times)

    def sequence_condition(self, cond: dict[str, Any]) -> Tensor | None:
        """The T5 tokens."""
        return cond.get("txt")

    def pooled_condition(self, cond: dict[str, Any]) -> Tensor | None:
        """The pooled CLIP embedding."""
        return cond.get("vec")

    def image_conditions(self, request: GenerationRequest, batch: int) -> dict[str, Tensor]:
        """Kontext tokens and Fill / control channels from the request's images, ``batch`` rows each."""
        refs, image, mask, control_image = request.reference_images, request.image, request.mask, request.control_image
        p = self.network.params
        wanted = p.in_channels - p.out_channels
        control = p.out_channels  # the control map's packed latents are as wide as the noisy ones
        fill = control + 4 * (self.pixels_per_token // 2) ** 2  # and the 8x8-unshuffled, 2x2-packed mask
        out: dict[str, Tensor] = {}
        if refs:
            if wanted:
                raise ConfigError(f"reference images (Kontext editing) need a 64-channel FLUX.1 variant; this "
                                  f"transformer takes {p.in_channels} (Fill / Canny / Depth)",
                                  path="job.reference_image")
            out["ref"], out["ref_ids"] = self.encode_references(refs)
        if wanted == fill:
            if image is None or mask is None:
                raise ConfigError("FLUX.1 Fill repaints the white part of a mask: set both image and mask",
                                  path="job.mask" if image is not None or control_image is not None else "job.image")
            out["img_cond"] = self.fill_tokens(image, mask, self._size(request))
        elif wanted == control:
            if control_image is None:
                raise ConfigError("FLUX.1 Canny / Depth follow a control image (an edge or depth map): set image, "
                                  "without a mask", path="job.mask" if mask is not None else "job.image")
            out["img_cond"] = self.control_tokens(control_image, self._size(request))
        elif wanted:
            raise ConfigError(f"a FLUX.1 transformer with {p.in_channels} input channels is no known variant "
                              f"({p.out_channels}: text-to-image / Kontext, {p.out_channels + control}: Canny / Depth, "
                              f"{p.out_channels + fill}: Fill)", path="model.variant")
        elif image is not None or mask is not None or control_image is not None:
            raise ConfigError("image / mask need the fill-dev variant (image + mask) or canny-dev / depth-dev "
                              "(image = control map); for image-to-image set init_image",
                              path="job.mask" if image is None and mask is not None else "job.image")
        return {k: v.expand(batch, *v.shape[1:]) for k, v in out.items()}

    def encode_references(self, images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Kontext reference images (3, H, W) in [-1, 1] -> tokens (1, N, 64) and ids (1, N, 3) at
        t = 1, each on its own grid (BFL's ``prepare_kontext``; one reference is what FLUX.1
        Kontext was trained with)."""
        tokens, ids = [], []
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ConfigError(f"reference image {i} has shape {tuple(image.shape)}; expected (3, H, W)",
                                  path="job.reference_image")
            height, width = (kontext_size(*image.shape[-2:]) if self.resize_references
                             else (self._whole(image.shape[-2]), self._whole(image.shape[-1])))
            latents = self.vae_encode(fit(image, height, width)[None])
            tokens.append(pack(latents))
            ids.append(prepare_kontext_ids(latents.shape[-2] // 2, latents.shape[-1] // 2).to(self.device))
        return torch.cat(tokens, dim=1), torch.cat(ids, dim=1)

    def fill_tokens(self, image: Tensor, mask: Tensor, size: tuple[int, int]) -> Tensor:
        """Fill-dev's 320 extra channels from an image (3, H, W) in [-1, 1] and a mask (1, H, W)
        in [0, 1] (1 = repaint), both brought to the target ``size``."""
        image, mask = fit(image, *size).to(self.device), fit(mask, *size).to(self.device)
        latents = self.vae_encode((image * (1 - mask))[None])
        return fill_condition(latents, mask[None])

    def control_tokens(self, image: Tensor, size: tuple[int, int]) -> Tensor:
        """Canny- / Depth-dev's 64 extra channels: the control map's packed latents."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ConfigError(f"the control image has shape {tuple(image.shape)}; expected (3, H, W)", path="job.image")
        return pack(self.vae_encode(fit(image, *size)[None].to(self.device)))

    # -- shapes and the autoencoder ---------------------------------------------------------------
    def _size(self, request: GenerationRequest) -> tuple[int, int]:
        """The target's (height, width) in pixels: the request's, else the Fill / control image's,
        else the (resized) Kontext reference's, as BFL's CLIs do, else ``default_size``."""
        height, width = request.height, request.width
        for side, value in (("height", height), ("width", width)):
            if value is not None and value % self.pixels_per_token:
                raise ConfigError(f"FLUX.1 images must be multiples of {self.pixels_per_token} pixels on each side, "
                                  f"got {width}x{height}", path=f"job.{side}")
        if height and width:
            return height, width
        refs = request.reference_images
        image = request.image if request.image is not None else request.control_image
        if image is None and request.controls:
            image = request.controls[0].image
        if image is not None:
            derived = tuple(self._whole(s) for s in image.shape[-2:])
        elif refs:
            derived = (kontext_size(*refs[0].shape[-2:]) if self.resize_references
                       else tuple(self._whole(s) for s in refs[0].shape[-2:]))
        else:
            derived = (self.default_size, self.default_size)
        return height or derived[0], width or derived[1]

    def _whole(self, size: int) -> int:
        return token_multiple(size, self.pixels_per_token)

    def latent_shape(self, request: GenerationRequest) -> tuple[int, int, int]:
        height, width = self._size(request)
        return (self.network.params.out_channels, height // self.pixels_per_token, width // self.pixels_per_token)

    def seq_len(self, request: GenerationRequest) -> int:
        """Image tokens: one per latent position (16 x 16 pixels)."""
        height, width = self._size(request)
        return (height // self.pixels_per_token) * (width // self.pixels_per_token)

    def image_shape(self, request: GenerationRequest) -> tuple[int, int, int]:
        return (3, *self._size(request))

    def vae_encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> normalised latents (B, 16, H/8, W/8), float32. The
        posterior mean, as diffusers' Kontext pipeline takes it (BFL draws a sample; its spread
        is tiny for the trained autoencoder)."""
        if self.vae is None:
            raise ConfigError("this FLUX.1 bundle has no autoencoder: set vae to a local ae.safetensors", path="model")
        self.offload.use("vae")
        return self.vae.encode(images.to(self.device, self.dtype)).float()

    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> packed latents (B, 64, H/16, W/16) (img2img's x0)."""
        return rearrange(self.vae_encode(images), "b c (h ph) (w pw) -> b (c ph pw) h w", ph=2, pw=2)

    def decode(self, latents: Tensor) -> Tensor:
        if self.vae is None:
            raise ConfigError("this FLUX.1 bundle has no autoencoder: set vae to a local ae.safetensors", path="model")
        self.offload.use("vae")
        z = rearrange(latents, "b (c ph pw) h w -> b c (h ph) (w pw)", ph=2, pw=2).to(self.device, self.dtype)
        if max(z.shape[-2:]) > TILE_LATENT:
            return self.vae.decode_tiled(z, tile=TILE_LATENT // 2, overlap=TILE_LATENT // 8)
        return self.vae.decode(z)

    def attention_alias(self, name: str) -> str:
        return attention_alias(name)

    # -- training ---------------------------------------------------------------------------------
    def training_tokens(self, latents: Tensor) -> int:
        """One token per packed latent position."""
        return latents.shape[-2] * latents.shape[-1]

    def encode_captions(self, captions: list[str]) -> dict[str, Tensor]:
        """``txt`` (B, max_length, 4096) T5 states and ``vec`` (B, 768) pooled CLIP, float32 on the device."""
        if self.text is None:
            raise ConfigError("this FLUX.1 bundle has no text encoders: set text_encoders to a local diffusers "
                              "FLUX.1 folder, or cache the text embeddings", path="model.text_encoders")
        self.offload.use("text")
        with self.text_grad():
            txt, vec = self.text.encode(list(captions), device=self.device)
        return {"txt": txt.float(), "vec": vec.float()}

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """CLIP-L as ``text_encoder`` (kohya's ``lora_te1_``); T5 is left out, as kohya's sd-scripts
        and diffusers' FLUX DreamBooth script leave it."""
        return {} if self.text is None else {"text_encoder": self.text.clip}

    def training_inputs(self, batch: dict[str, Any], *, dropout: float = 0.0,
                        generator: torch.Generator | None = None) -> dict[str, Any]:
        """``txt`` / ``vec`` from ``batch["text"]`` (a text cache) or the encoded ``batch["caption"]``,
        each sample's replaced by the empty prompt's with probability ``dropout``; the embedded
        guidance at ``train_guidance`` for dev-like variants (ignored by schnell's network)."""
        text = self.caption_text(batch, device=self.device, dropout=dropout, generator=generator)
        txt, vec = text["txt"], text["vec"]
        b = txt.shape[0]
        return {"txt": txt, "vec": vec, "guidance": torch.full((b,), self.train_guidance, device=self.device)}

    def diffusers_modules(self, modules: list[str]) -> list[tuple[str, str]]:
        return diffusers_modules(modules)
