"""What the SDXL family hands the core: a discrete-time epsilon (or v) UNet on VAE latents,
conditioned on two CLIP text encoders and the micro-conditioning scalars.

The network sees what diffusers' ``EulerDiscreteScheduler`` gives it: ``x / sqrt(sigma^2 + 1)``
and the DDPM timestep of sigma on the scaled-linear table (the core's ``ddpm_sigma_table``).
With a refiner the base denoises the high-noise part and the refiner the rest (diffusers'
"ensemble of experts": ``denoising_end`` / ``denoising_start`` at ``switch_at``), each with its
own text encoders and label embedding; the branch tensors carry both experts' conditioning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor, nn

from diffcore.api import ConfigError, LazyComponent, ModelBundle, ddpm_sigma_table

from diffcore_sdxl.controlnet import (SDXLControl, control_conditions, new_controlnet, residuals, schedule_controls,
                                      training_controls)
from diffcore_sdxl.inpaint import blend, first_step, inpaint_conditions
from diffcore_sdxl.model import UNet, attention_alias, label_vector
from diffcore_sdxl.training import LORA_PRESETS
from diffcore_sdxl.text import SDXLText, micro_conditioning

@attrs.frozen
class MicroConditioning:
    """What the label embedding is told about the image; sizes default to the output's (diffusers)."""

    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


@attrs.define(eq=False)
class Expert:
    """One UNet with its text encoders (the refiner is one, taking over below timestep ``switch_t``)."""

    network: UNet
    text: SDXLText
    switch_t: float = 0.0

    def scalars(self, pooled_dim: int) -> int:
        p = self.network.params
        n, rest = divmod(p.adm_in_channels - pooled_dim, p.time_embed_scalar_dim)
        if rest or n not in (5, 6):
            raise ConfigError(f"the UNet's label embedding takes {p.adm_in_channels} features; pooled text of "
                              f"{pooled_dim} leaves {p.adm_in_channels - pooled_dim}, which is neither 6 (base: "
                              f"sizes) nor 5 (refiner: aesthetic score) scalars of {p.time_embed_scalar_dim}")
        return n

    def branches(self, prompts: Sequence[str], negatives: Sequence[str | None], size: tuple[int, int],
                 micro: MicroConditioning) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(cond, uncond) tensors ``context`` and ``y`` for this expert."""
        context, pooled = self.text.encode(prompts)
        neg_context, neg_pooled = self.text.encode_negative(negatives, (context, pooled))
        aesthetic = self.scalars(pooled.shape[-1]) == 5
        common = dict(original_size=micro.original_size, crop=tuple(micro.crop_top_left), target_size=micro.target_size)
        pos = micro_conditioning(*size, aesthetic=aesthetic, aesthetic_score=micro.aesthetic_score, **common)
        neg = micro_conditioning(*size, aesthetic=aesthetic, aesthetic_score=micro.negative_aesthetic_score, **common)
        dim, dtype = self.network.params.time_embed_scalar_dim, next(self.network.parameters()).dtype

        def y(vec: Tensor, scalars: list[float]) -> Tensor:
            ids = torch.tensor([scalars] * vec.shape[0], device=vec.device)
            return label_vector(vec, ids, dim).to(dtype)

        return ({"context": context.to(dtype), "y": y(pooled, pos)},
                {"context": neg_context.to(dtype), "y": y(neg_pooled, neg)})


def on_grid(t: Tensor) -> Tensor:
    """Timesteps within 1e-3 of an integer are that integer: schedules built on the training grid
    (leading / trailing spacing) come back from float32 sigmas a few 1e-5 off it."""
    r = t.round()
    return torch.where((t - r).abs() < 1e-3, r, t)


@attrs.define(eq=False)
class SDXLBundle(ModelBundle):
    _text: SDXLText | None = None           # init argument ``text`` (or ``loaders["text"]``)
    _vae: nn.Module | None = None           # init argument ``vae`` (or ``loaders["vae"]``)
    prediction_type: str = "epsilon"
    default_sampling_steps: int = 50
    default_schedule: dict[str, Any] = attrs.Factory(lambda: {"name": "ddpm", "spacing": "leading",
                                                              "steps_offset": 1})
    sigma_table: Tensor | None = attrs.Factory(ddpm_sigma_table)
    default_cfg_scale: float = 5.0
    default_size: int = 1024
    latent_scale: int = 8                 # pixels per latent cell (the VAE's downsampling)
    micro: MicroConditioning = attrs.Factory(MicroConditioning)
    refiner: Expert | None = None
    controlnets: dict[str, Any] = attrs.Factory(dict)   # loaded for [[control]] tables, by path
    takes_controls: ClassVar[bool] = True
    lora_presets: ClassVar[dict[str, list[str]]] = LORA_PRESETS

    vae = LazyComponent()
    text = LazyComponent()

    @property
    def base(self) -> Expert:
        return Expert(self.network, self.text)

    def forward(self, x: Tensor, sigma: Tensor, context: Tensor, y: Tensor, refiner_context: Tensor | None = None,
                refiner_y: Tensor | None = None, control: Sequence[SDXLControl] = (), known: Tensor | None = None,
                known_mask: Tensor | None = None, masked: Tensor | None = None,
                inpaint_first: tuple[float, float] | None = None, inpaint_fresh: bool = False) -> Tensor:
        """``sigma`` is the DDPM timestep here (the bundle has a ``sigma_table``); ``control``: the
        ControlNets steering the base UNet; ``known`` / ``known_mask`` / ``masked``: inpainting
        (``diffcore_sdxl.inpaint``)."""
        t = on_grid(sigma)

        def run(net: UNet, ctx: Tensor, vec: Tensor, extra: dict[str, Any]) -> Tensor:
            inputs = x
            if net.params.in_channels == 9:
                if masked is None:
                    raise ConfigError("the 9-channel inpainting UNet needs an image and a mask to repaint",
                                      path="job.mask")
                inputs = torch.cat([x, known_mask.to(x.dtype), masked.to(x.dtype)], dim=1)
            out = net(inputs, t, ctx, vec, **extra)
            if known is not None and net.params.in_channels == 4:
                out = blend(out, x, t, self.sigma_at(t), known, known_mask, self.prediction_type, inpaint_first)
            return out

        if self.refiner is None or refiner_context is None:
            return run(self.network, context, y, residuals(control, x, t, context, y))
        late = t < self.refiner.switch_t
        if bool(late.all()):
            return run(self.refiner.network, refiner_context, refiner_y, {})
        base = run(self.network, context, y, {})
        if not bool(late.any()):
            return base
        refined = run(self.refiner.network, refiner_context, refiner_y, {})   # per-sample times straddle the switch
        return torch.where(late[:, None, None, None], refined, base)

    def sigma_at(self, t: Tensor) -> Tensor:
        """The sigma of (fractional) DDPM timesteps ``t``, linear in log-sigma between table entries."""
        table = self.sigma_table.to(t.device, torch.float64).log()
        t = t.double().clamp(0, len(table) - 1)
        low = t.floor().long().clamp(max=len(table) - 2)
        return torch.lerp(table[low], table[low + 1], t - low).exp()

    def size(self, request: Any) -> tuple[int, int]:
        """The request's size; where it gives none, the image to repaint's (down to a multiple of 8,
        as diffusers'), else the variant's default."""
        image = _field(request, "image")
        default = (self.default_size, self.default_size) if image is None or _field(request, "mask") is None else \
            tuple(int(n) // self.latent_scale * self.latent_scale for n in image.shape[-2:])
        h, w = _field(request, "height") or default[0], _field(request, "width") or default[1]
        if h % self.latent_scale or w % self.latent_scale:
            raise ConfigError(f"SDXL images are multiples of {self.latent_scale} pixels on each side; "
                              f"{h} x {w} is not", path="job.height")
        return h, w

    def conditions(self, request: Any) -> dict[str, dict[str, Any]]:
        """``cond`` / ``uncond`` from the prompts (or ``request.embeddings``: ``context`` and ``y`` per
        branch, the text encoders skipped); each also carries the refiner's when there is one."""
        for name, what in (("control_image", "control images (use a [[control]] ControlNet)"),
                           ("reference_images", "reference images")):
            if _field(request, name) is not None and _field(request, name) != []:
                raise ConfigError(f"SDXL takes no {name} here: {what} is not built for this family yet",
                                  path=f"job.{name}")
        size = self.size(request)
        control = control_conditions(self, request, size)
        if _field(request, "image") is not None or _field(request, "mask") is not None:
            control = {**control, **inpaint_conditions(self, request, size, _field(request, "batch") or 1)}
        elif self.network.params.in_channels == 9:
            raise ConfigError("this is a 9-channel inpainting UNet: give image (what to repaint) and mask "
                              "(white = repaint)", path="job.mask")
        embeddings = _field(request, "embeddings")
        if embeddings:
            return {key: {**value, **control} for key, value in embeddings.items()}
        prompts = _field(request, "prompts")
        if not prompts:
            raise ConfigError("SDXL is a text-to-image model: give a prompt", path="job.prompt")
        negatives = _field(request, "negative_prompts") or [None] * len(prompts)
        cond, uncond = self.base.branches(prompts, negatives, size, self.micro)
        if self.refiner is not None:
            r_cond, r_uncond = self.refiner.branches(prompts, negatives, size, self.micro)
            cond.update(refiner_context=r_cond["context"], refiner_y=r_cond["y"])
            uncond.update(refiner_context=r_uncond["context"], refiner_y=r_uncond["y"])
        return {"cond": {**cond, **control}, "uncond": {**uncond, **control}}

    def new_controlnet(self, **options: Any) -> nn.Module:
        return new_controlnet(self, **options)

    def control_inputs(self, controlnet: nn.Module, image: Tensor, *, scale: float = 1.0) -> dict[str, Any]:
        return training_controls(controlnet, image, scale)

    def schedule_conditions(self, conditions: dict[str, dict[str, Any]], times: Tensor) -> dict[str, dict[str, Any]]:
        """ControlNets learn the schedule's times, for their start / end; inpainting from pure noise
        its first step's."""
        return first_step(schedule_controls(conditions, times), on_grid(times), self.sigma_at)

    def sequence_condition(self, cond: dict[str, Any]) -> Tensor | None:
        return cond.get("context")

    def pooled_condition(self, cond: dict[str, Any]) -> Tensor | None:
        """The pooled text: the head of ``y``, before the micro-conditioning sinusoids."""
        y = cond.get("y")
        return None if y is None or self.text is None else y[:, :self.text.pooled_dim]

    def latent_shape(self, request: Any) -> tuple[int, int, int]:
        h, w = self.size(request)
        return (self.network.params.out_channels, h // self.latent_scale, w // self.latent_scale)

    def image_shape(self, request: Any) -> tuple[int, int, int]:
        return (3, *self.size(request))

    def decode(self, latents: Tensor) -> Tensor:
        return self._autoencoder().decode(latents)

    def encode(self, images: Tensor) -> Tensor:
        return self._autoencoder().encode(images)

    def _autoencoder(self) -> nn.Module:
        if self.vae is None:
            raise ConfigError("this SDXL model was loaded without its VAE; set vae in [model]", path="model.vae")
        return self.vae

    def attention_alias(self, name: str) -> str:
        return attention_alias(name, self.network.params)

    #: diffusers' LoRA files key the UNet's layers ``unet.<module>``
    lora_prefix: ClassVar[str] = "unet"

    def diffusers_modules(self, modules: list[str]) -> list[tuple[str, str]]:
        from diffcore_sdxl.convert import diffusers_modules

        shapes = {k.replace(".base_layer.", "."): tuple(v.shape) for k, v in self.network.state_dict().items()
                  if ".lora_" not in k}   # a peft-wrapped training network named as the plain one
        return diffusers_modules(shapes, modules)

    def encode_captions(self, captions: list[str]) -> dict[str, Tensor]:
        """``context`` (B, 77, 2048: CLIP-L ‖ bigG penultimate states) and ``pooled`` (B, 1280: bigG's
        projected output), float32: what a text cache stores; ``training_inputs`` adds each image's
        micro-conditioning to ``pooled``. An empty caption is the model's unconditional input (zeros
        for base, as sampling's empty negative prompt)."""
        captions = [c or "" for c in ([captions] if isinstance(captions, str) else list(captions))]
        grad = self.train_text   # text-encoder LoRA: keep the graph through the encoders
        context, pooled = self.text.encode(captions, grad=grad)
        if any(not c for c in captions):
            empty = torch.tensor([not c for c in captions], device=context.device)
            neg_context, neg_pooled = self.text.encode_negative([""] * len(captions), (context, pooled), grad=grad)
            context = torch.where(empty[:, None, None], neg_context, context)
            pooled = torch.where(empty[:, None], neg_pooled, pooled)
        return {"context": context.float(), "pooled": pooled.float()}

    def text_encoders(self) -> dict[str, nn.Module]:
        """CLIP-L as ``text_encoder`` and bigG as ``text_encoder_2`` (kohya's ``lora_te1_`` /
        ``lora_te2_``; the refiner has bigG alone), as diffusers' SDXL DreamBooth script trains them."""
        if self.text is None:
            return {}
        encoders = list(self.text.encoders)
        names = ["text_encoder", "text_encoder_2"][-len(encoders):]
        return dict(zip(names, encoders))

    def training_inputs(self, batch: dict[str, Any], *, dropout: float = 0.0,
                        generator: torch.Generator | None = None) -> dict[str, Any]:
        """``context`` and ``y`` for a batch of captioned images, from ``batch["text"]`` (a text
        cache) or the encoded ``batch["caption"]``: each sample's text is replaced by the empty
        caption's (``empty_text``, or "" encoded once) with probability ``dropout``; the label
        embedding gets each image's ``original_size`` and ``crop_top_left`` (B, 2) where the batch
        has them (bucketed data) and its ``target_size`` (else the training size)."""
        if "text" in batch:
            text = batch["text"]
        elif "caption" in batch:
            text = self.encode_captions(batch["caption"])
        else:
            raise ConfigError("SDXL trains on captioned images: the batch has neither caption nor cached text",
                              path="dataset")
        device = next(self.network.parameters()).device
        context, pooled = text["context"].to(device), text["pooled"].to(device)
        n = context.shape[0]
        if dropout > 0:
            drop = (torch.rand(n, generator=generator) < dropout).to(device)
            if drop.any():
                empty_text = self.empty_caption_text()
                empty_c, empty_p = (empty_text[k].to(device, context.dtype) for k in ("context", "pooled"))
                if empty_c.shape[1:] != context.shape[1:]:
                    raise ConfigError(f"the empty caption's text embedding has shape {tuple(empty_c.shape[1:])}, the "
                                      f"captions' {tuple(context.shape[1:])}: a text cache written with other "
                                      f"encoders", path="dataset.cache_dir")
                context = torch.where(drop[:, None, None], empty_c.expand_as(context), context)
                pooled = torch.where(drop[:, None], empty_p.expand_as(pooled), pooled)
        sample = batch["latents"] if "latents" in batch else batch["image"]
        scale = self.latent_scale if "latents" in batch or sample.shape[1] == self.network.params.out_channels else 1
        size = (sample.shape[-2] * scale, sample.shape[-1] * scale)
        aesthetic = self.base.scalars(pooled.shape[-1]) == 5
        rows = []
        for i in range(n):
            target = _pair(batch.get("target_size"), i) or size
            rows.append(micro_conditioning(*target, aesthetic=aesthetic, original_size=_pair(batch.get("original_size"), i)
                                           or target, crop=_pair(batch.get("crop_top_left"), i) or (0, 0),
                                           target_size=target, aesthetic_score=self.micro.aesthetic_score))
        ids = torch.tensor(rows, device=device)
        dtype = next(self.network.parameters()).dtype
        return {"context": context.to(dtype),
                "y": label_vector(pooled, ids, self.network.params.time_embed_scalar_dim).to(dtype)}


def _pair(value: Any, i: int) -> tuple[int, int] | None:
    if value is None:
        return None
    row = value[i]
    return tuple(int(v) for v in (row.tolist() if isinstance(row, Tensor) else row))


def _field(request: Any, key: str) -> Any:
    return request.get(key) if isinstance(request, Mapping) else getattr(request, key, None)
