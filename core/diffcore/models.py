"""What a model family hands the core (a ``ModelBundle``) and what the core asks of it (a
``GenerationRequest``).

A family's factory (registered with ``register_models``) returns a ``ModelBundle``. The generation
pipeline (``diffcore.sampling.pipeline``), the training loop and guidance processors use nothing
else, so they work for any family.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
from torch import nn

Conditioning = dict[str, Any]   # one branch's keyword arguments for ``ModelBundle.forward``


class LazyComponent:
    """A bundle component (autoencoder, text encoders) that loads on first use.

    A run on cached latents and text never needs the autoencoder or text encoders, so a family
    built from files hands ``bundle.loaders[name]`` a loader instead of loading them. Declare
    ``vae = LazyComponent()`` beside an attrs field ``_vae`` (init argument ``vae``): reading
    ``bundle.vae`` calls the loader once, assigning sets it."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.slot = name, f"_{name}"

    def __get__(self, bundle: Any, owner: type | None = None) -> Any:
        if bundle is None:
            return self
        module = getattr(bundle, self.slot)
        if module is None and self.name in bundle.loaders:
            module = bundle.loaders.pop(self.name)()
            setattr(bundle, self.slot, module)
        return module

    def __set__(self, bundle: Any, module: Any) -> None:
        setattr(bundle, self.slot, module)


@attrs.frozen(eq=False)
class Control:
    """One ControlNet to follow (a ``[[control]]`` table): its weights (``path``, loaded by the
    family), its conditioning image (3, H, W) in [-1, 1], the scale of its residuals (diffusers'
    ``controlnet_conditioning_scale``), the part of the schedule it acts on as fractions of the steps
    (``control_guidance_start`` / ``_end``) and, for Union ControlNets, the control mode."""

    path: str
    image: torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: int | None = None

    def scale_at(self, step: int, steps: int) -> float:
        """The scale at ``step`` of ``steps``: 0 outside [start, end] (diffusers' ``controlnet_keep``:
        off when ``step / steps < start`` or ``(step + 1) / steps > end``)."""
        return 0.0 if step / steps < self.start or (step + 1) / steps > self.end else self.scale

    def check_image(self, height: int, width: int, where: str = "control") -> None:
        """The image is RGB and has the output's aspect ratio (within 1%): families resize it to
        (height, width), which must not distort it."""
        from diffcore.errors import ConfigError

        if self.image.ndim != 3 or self.image.shape[0] != 3:
            raise ConfigError(f"the control image has shape {tuple(self.image.shape)}; expected an RGB image "
                              f"(3, height, width)", path=f"{where}.image")
        h, w = self.image.shape[-2:]
        if abs(h * width - w * height) > 0.01 * h * width:
            raise ConfigError(f"the control image is {w}x{h} pixels and the output {width}x{height}: another aspect "
                              f"ratio; crop the image to the output's, or set width and height to match it",
                              path=f"{where}.image")


@attrs.define
class GenerationRequest:
    """What to generate, family-agnostic. ``batch`` is the number of samples in this forward.

    Class-conditional families read ``labels``; text families ``prompts`` (and
    ``negative_prompts`` for the unconditional branch) or, to skip their text encoders,
    ``embeddings``: precomputed conditioning per branch key in the family's own names (FLUX.1:
    ``{"cond": {"txt": ..., "vec": ...}}``).

    Images are (C, H, W) tensors in [-1, 1]; masks (1, H, W) in [0, 1], 1 = repaint. A family
    raises a ``ConfigError`` for an image it cannot use.

    ``controls`` are ControlNets to follow, each with its own image; the family loads them.

    ``sampling_steps`` and ``cfg_scale`` left None are the bundle's defaults; ``init_image`` with
    ``strength`` < 1 is image-to-image (the pipeline runs the last ``strength`` of the schedule).
    """

    batch: int
    labels: torch.Tensor | None = None
    prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    embeddings: dict[str, Conditioning] | None = None
    height: int | None = None
    width: int | None = None
    init_image: torch.Tensor | None = None         # image-to-image: sampling starts from it, noised
    strength: float = 1.0
    reference_images: list[torch.Tensor] = attrs.Factory(list)   # editing: FLUX.1 Kontext, FLUX.2
    image: torch.Tensor | None = None               # the image ``mask`` repaints (inpainting, Fill)
    mask: torch.Tensor | None = None
    control_image: torch.Tensor | None = None       # a structure map to follow (Canny, Depth)
    controls: list[Control] = attrs.Factory(list)   # ControlNets, each with its conditioning image
    sampling_steps: int | None = None
    cfg_scale: float | None = None


@attrs.define(eq=False)
class ModelBundle:
    """Base class for families; override what applies."""

    network: nn.Module
    prediction_type: str = "flow"        # "flow" (velocity) | "epsilon" | "v"
    default_sampling_steps: int = 28
    default_schedule: dict[str, Any] = attrs.Factory(lambda: {"name": "flow"})
    default_cfg_scale: float = 1.0       # 1.0: no classifier-free guidance unless a job asks for it
    # discrete-time models (epsilon / v): training sigmas indexed by timestep, e.g.
    # ``diffcore.sampling.schedules.ddpm_sigma_table()``; the denoiser then passes ``forward`` that
    # fractional timestep instead of sigma. None: the network takes sigma itself.
    sigma_table: torch.Tensor | None = None
    #: Families that run ControlNets (``GenerationRequest.controls``) say so; the pipeline refuses
    #: a request with controls for any other, rather than ignoring them.
    takes_controls: ClassVar[bool] = False

    @property
    def num_classes(self) -> int | None:
        """Class-conditional families: the number of classes (labels 0..num_classes - 1)."""
        return None

    # -- sampling ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        """The network's raw prediction at noise level ``sigma`` (shape (batch,)) given conditioning.

        Called by the denoiser (``diffcore.sampling.denoisers``): flow models get ``x`` and sigma
        as they are; epsilon / v models get ``x / sqrt(sigma^2 + 1)`` and, with ``sigma_table``
        set, the fractional training timestep in place of sigma."""
        return self.network(x, sigma, **cond)

    def conditions(self, request: GenerationRequest) -> dict[str, Conditioning]:
        """Conditioning per branch key (``cond``, ``uncond``, ...) for a generation request."""
        raise NotImplementedError

    def schedule_conditions(self, conditions: dict[str, Conditioning], times: torch.Tensor) -> dict[str, Conditioning]:
        """``conditions`` for a run whose steps give ``forward`` these times (the network's time
        argument per step, after img2img's skip): where conditioning changes along the schedule
        (a ControlNet's start / end) the family resolves it here. Default: unchanged."""
        return conditions

    def latent_shape(self, request: GenerationRequest) -> tuple[int, ...]:
        """Shape of one sample's initial noise, in whatever layout ``forward`` and ``decode`` take."""
        raise NotImplementedError

    def seq_len(self, request: GenerationRequest) -> int | None:
        """How many image tokens the network sees for this request: what a resolution-dependent
        schedule shifts by (FLUX's). None: this family's schedules do not depend on the size."""
        return None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in [-1, 1], (batch, channels, height, width)."""
        return latents

    def image_shape(self, request: GenerationRequest) -> tuple[int, ...]:
        """(channels, height, width) of the images ``decode`` returns; pixel-space models: the latent shape."""
        return self.latent_shape(request)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to the latents ``decode`` inverts (img2img starts from these)."""
        return images

    def attention_alias(self, name: str) -> str:
        """Map another tool's layer name (diffusers' ``transformer_blocks.8.attn``) to ours."""
        return name

    # -- what guidance models read from one branch's conditioning -------------------------------------
    def sequence_condition(self, cond: Conditioning) -> torch.Tensor | None:
        """The conditioning tokens (batch, tokens, dim), e.g. a text encoder's; None without."""
        return None

    def pooled_condition(self, cond: Conditioning) -> torch.Tensor | None:
        """One conditioning value per sample: a pooled embedding (batch, dim) or integer class
        labels (batch,); None without."""
        return None

    # -- training ---------------------------------------------------------------------------------
    # The data a trainer sees is a dict batch. Image datasets give ``image`` (B, 3, H, W) in
    # [-1, 1], captioned ones also ``caption`` (a list of B strings) and, when bucketed,
    # ``original_size`` / ``crop_top_left`` / ``target_size`` (B, 2) as (height, width) pixels.
    # A latent cache replaces ``image`` by ``latents`` (what ``encode`` returned) and a text cache
    # adds ``text``: the dict ``encode_captions`` returned, batch first.

    #: Set by a text-embedding cache: ``encode_captions([""])`` read back from disk, so caption
    #: dropout needs no text encoder. None: the bundle encodes "" itself when it must.
    empty_text: dict[str, torch.Tensor] | None = attrs.field(default=None, kw_only=True)
    #: components not loaded yet (``"vae"``, ``"text"``) -> loader, called on first use (``LazyComponent``)
    loaders: dict[str, Any] = attrs.field(factory=dict, kw_only=True)

    #: Set by a trainer that trains text-encoder adapters (``trainer.train_text_encoder``):
    #: ``encode_captions`` then keeps the autograd graph through those encoders and caption dropout
    #: encodes "" each time (a stored empty prompt would not follow the training encoders).
    train_text: bool = attrs.field(default=False, kw_only=True)

    def loaded(self, name: str) -> bool:
        """Whether the lazy component ``name`` is in memory (what a cache test asks)."""
        return getattr(self, f"_{name}", None) is not None

    def training_latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """The clean sample ``x0`` the objective noises: cached ``latents``, else ``encode(image)``."""
        if "latents" in batch:
            return batch["latents"]
        with torch.no_grad():
            return self.encode(batch["image"])

    def training_tokens(self, latents: torch.Tensor) -> int | None:
        """Image tokens per sample of ``latents`` (batch first): what FLUX's resolution-dependent
        timestep shift depends on. None: the family's network is not a transformer over tokens."""
        return None

    def encode_captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Text conditioning per caption, batch-first tensors in the family's own names: what a
        text-embedding cache stores and ``training_inputs`` reads back from ``batch["text"]``."""
        raise NotImplementedError(f"{type(self).__name__} has no text encoders")

    #: ``encoder_identity`` known from the files a family built from disk (``diffcore.api.fingerprint``)
    identity: dict[str, str] = attrs.field(factory=dict, kw_only=True)

    def encoder_identity(self) -> dict[str, str]:
        """Strings that change whenever the autoencoder (``"vae"``) or text encoders (``"text"``)
        change; caches key their entries by them: ``identity`` from the files, else a fingerprint
        of the component's weights (a bundle built in memory). Empty: nothing to key by."""
        from diffcore.io.fingerprint import module_fingerprint

        out = dict(self.identity)
        for name in ("vae", "text"):
            if name not in out and (self.loaded(name) or name in self.loaders):
                out[name] = module_fingerprint(getattr(self, name))
        return out

    def text_encoders(self) -> dict[str, nn.Module]:
        """The text encoders a LoRA may train (``trainer.train_text_encoder``) and load, by the prefix
        their keys have in diffusers' LoRA files (``text_encoder``, ``text_encoder_2``): each a
        transformers model whose module names are its own (``text_model.encoder.layers.0.self_attn.q_proj``).
        The prefix's number n is kohya's ``lora_te{n}_`` (``text_encoder`` -> ``lora_te1_``).
        Encoders trained by nobody (FLUX's and SD3's T5) stay out. Empty: none (the default)."""
        return {}

    def text_grad(self) -> Any:
        """The context text encoding runs in: without gradients unless ``train_text``."""
        import contextlib

        return contextlib.nullcontext() if self.train_text else torch.no_grad()

    def empty_caption_text(self) -> dict[str, torch.Tensor]:
        """The empty prompt's text conditioning for caption dropout: ``empty_text`` (kept after the
        first encoding), or encoded afresh each time while the text encoders train."""
        if self.train_text:
            return self.encode_captions([""])
        if self.empty_text is None:
            self.empty_text = {k: v.detach() for k, v in self.encode_captions([""]).items()}
        return self.empty_text

    def caption_text(self, batch: dict[str, Any], *, device: Any, dropout: float = 0.0,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The batch's text conditioning on ``device``: ``batch["text"]`` (a text cache) or its
        encoded ``batch["caption"]``; each sample's rows replaced by the empty prompt's
        (``empty_text``, else "" encoded once) with probability ``dropout``, drawn from ``generator``
        (one draw per sample, whatever the dropout)."""
        from diffcore.errors import ConfigError

        if "text" in batch:
            text = batch["text"]
        elif "caption" in batch:
            captions = batch["caption"]
            text = self.encode_captions([captions] if isinstance(captions, str) else list(captions))
        else:
            raise ConfigError(f"{type(self).__name__} trains on captioned images: the batch has neither caption "
                              "nor cached text", path="dataset")
        text = {k: v.to(device) for k, v in text.items()}
        if dropout <= 0:
            return text
        b = next(iter(text.values())).shape[0]
        drop = (torch.rand(b, generator=generator) < dropout).to(device)
        if not drop.any():
            return text
        empty_text = self.empty_caption_text()
        out = {}
        for key, value in text.items():
            empty = empty_text[key].to(device, value.dtype)
            if empty.shape[1:] != value.shape[1:]:
                raise ConfigError(f"the empty prompt's {key} has shape {tuple(empty.shape[1:])}, the captions' "
                                  f"{tuple(value.shape[1:])}: a text cache written with another max_sequence_length "
                                  f"or encoder", path="job.cache_dir")
            out[key] = torch.where(drop.view(-1, *[1] * (value.ndim - 1)), empty.expand_as(value), value)
        return out

    def training_inputs(self, batch: dict[str, Any], *, dropout: float = 0.0,
                        generator: torch.Generator | None = None) -> Conditioning:
        """Conditioning kwargs for ``forward`` from a data batch; ``dropout`` is the rate at which
        the condition is replaced by the unconditional one (for classifier-free guidance)."""
        return {}

    def new_controlnet(self, **options: Any) -> nn.Module:
        """A ControlNet to train for ``network``, initialised from it (the ``controlnet`` trainer)."""
        from diffcore.errors import ConfigError

        raise ConfigError(f"{type(self).__name__} has no ControlNets to train", path="trainer")

    def control_inputs(self, controlnet: nn.Module, image: torch.Tensor, *, scale: float = 1.0) -> Conditioning:
        """The ``forward`` kwargs that run ``controlnet`` on conditioning images (B, 3, H, W) in [-1, 1]."""
        from diffcore.errors import ConfigError

        raise ConfigError(f"{type(self).__name__} has no ControlNets to train", path="trainer")

    #: LoRA target presets: name -> ``fnmatch`` patterns over ``network.named_modules()`` names.
    #: Families define at least ``attention``, ``attention-mlp`` and ``all-linear``.
    lora_presets: ClassVar[dict[str, list[str]]] = {}

    def diffusers_modules(self, modules: list[str]) -> list[tuple[str, str]]:
        """(diffusers module name, ours) for each of our ``modules`` that diffusers' model has; a
        fused layer of ours appears once per diffusers part (FLUX's ``img_attn.qkv`` as ``attn.to_q``,
        ``attn.to_k``, ``attn.to_v``). Empty: the network has diffusers' names already."""
        return []

    def lora_patterns(self, pattern: str) -> list[str]:
        """A user's target pattern as patterns over this network's module names: in our naming as
        it is or (peft's rule) as the last dotted parts of a name; in diffusers' naming (a leading
        ``transformer.`` / ``unet.`` allowed), the layers of ours whose diffusers name it matches the
        same two ways (``to_q`` -> FLUX's every fused ``img_attn.qkv``)."""
        from fnmatch import fnmatchcase

        linears = [n for n, m in self.network.named_modules() if isinstance(m, nn.Linear)]
        bare = pattern.removeprefix("transformer.").removeprefix("unet.")
        matches = [pattern, f"*.{pattern}", bare, f"*.{bare}"]
        found = {ours: None for theirs, ours in self.diffusers_modules(linears)
                 if any(fnmatchcase(theirs, p) for p in matches)}
        return [*dict.fromkeys(matches), *found]

    def lora_targets(self, targets: str | list[str]) -> list[str]:
        """The names of the ``nn.Linear`` modules a LoRA on ``targets`` adapts: a preset name or a
        list of patterns in either naming. A pattern that matches no linear layer is an error."""
        from fnmatch import fnmatchcase

        from diffcore.errors import ConfigError, did_you_mean

        if isinstance(targets, str):
            if targets not in self.lora_presets:
                known = ", ".join(self.lora_presets) or "none"
                raise ConfigError(f"unknown LoRA target preset {targets!r}{did_you_mean(targets, self.lora_presets)}; "
                                  f"{type(self).__name__} has: {known}", path="trainer.target_modules")
            patterns, user = self.lora_presets[targets], False
        else:
            patterns, user = list(targets), True
        linears = [n for n, m in self.network.named_modules() if isinstance(m, nn.Linear)]
        chosen: dict[str, None] = {}
        for pattern in patterns:
            found = [n for p in (self.lora_patterns(pattern) if user else [pattern]) for n in linears
                     if fnmatchcase(n, p)]
            if not found:
                raise ConfigError(f"LoRA target {pattern!r} matches no linear layer of {type(self.network).__name__} "
                                  f"(its linear layers are named like {', '.join(linears[:4])}, ...)",
                                  path="trainer.target_modules")
            chosen.update(dict.fromkeys(found))
        return list(chosen)
