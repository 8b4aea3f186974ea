"""The core's trainers, registered through ``register_trainers``. Imports no torch.

A trainer factory is ``factory(config, bundle)`` and returns an object with
``trainable_parameters()`` and ``loss(bundle, batch, generator) -> scalar tensor``.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
from attrs import validators as v

from diffcore.errors import ConfigError, did_you_mean


@attrs.frozen
class Objective:
    """Objective settings every trainer shares (the objective itself follows the bundle's
    ``prediction_type``).

    ``timestep_sampling``: ``uniform``; ``logit-normal`` (``logit_mean``, ``logit_std``; SD3 uses
    0 and 1); ``shifted`` (``shift`` s maps t to s t / (1 + (s - 1) t); s > 1 favours high noise);
    ``flux-shift`` (logit-normal, then FLUX's shift for the image's token count, as sampling does).
    Epsilon / v models draw their discrete timestep as ``floor(t * len(bundle.sigma_table))``.
    """

    timestep_sampling: Literal["uniform", "logit-normal", "shifted", "flux-shift"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = attrs.field(default=1.0, validator=v.gt(0))
    shift: float = attrs.field(default=1.0, validator=v.gt(0))


@attrs.frozen
class FullConfig(Objective):
    """Every parameter of the network trains. ``cond_dropout``: rate at which
    ``bundle.training_inputs`` swaps in the unconditional input (labels, the empty prompt)."""

    cond_dropout: float = attrs.field(default=0.1, validator=[v.ge(0), v.le(1)])


def build_full(config: FullConfig, bundle: Any) -> Any:
    from diffcore.training.trainers import FullTrainer

    return FullTrainer(config, bundle)


def _targets(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not (isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(t, str) for t in value))):
        raise ConfigError(f"target_modules is a preset name (attention, attention-mlp, all-linear) or a non-empty "
                          f"list of module patterns, got {value!r}", path=attribute.name)


def _lora_format(_: Any, attribute: attrs.Attribute, value: str) -> None:
    from diffcore.lora.formats import FORMATS

    if value not in FORMATS and value != "peft":
        raise ConfigError(f"unknown LoRA save_format {value!r}{did_you_mean(value, FORMATS)}; "
                          f"one of: {', '.join(FORMATS)}", path=attribute.name)


#: CLIP's attention projections: the text-encoder LoRA targets of diffusers' DreamBooth scripts
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _text_targets(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not (isinstance(value, list) and value and all(isinstance(t, str) for t in value)):
        raise ConfigError(f"text_encoder_targets is a non-empty list of module patterns (q_proj, "
                          f"text_model.encoder.layers.*.mlp.fc1), got {value!r}", path=attribute.name)


@attrs.frozen
class LoraConfig(Objective):
    """Low-rank adapters on the network's linear layers, the base frozen (peft). ``rank`` r and
    ``alpha`` (default r: scale 1) set the update ``(alpha / r) B A``; ``dropout`` on the adapter's
    input; ``target_modules``: the family's preset (``attention``, ``attention-mlp``,
    ``all-linear``) or patterns in the family's or diffusers' naming (``double_blocks.*.img_attn.qkv``,
    ``to_q``); ``init``: peft's ``init_lora_weights`` (true: A Kaiming-uniform and B zero, so training
    starts at the base model; "gaussian"); ``save_format`` of the ``lora.safetensors`` it writes
    (``diffcore.lora.FORMATS``);
    ``cond_dropout``: the empty prompt's rate (kohya's ``caption_dropout_rate``).

    Text encoders (diffusers' ``--train_text_encoder``, kohya's default without
    ``--network_train_unet_only``): ``train_text_encoder`` adds adapters to the family's trainable
    text encoders (``ModelBundle.text_encoders``: FLUX.1's CLIP-L, SDXL's CLIP-L and bigG; T5 never)
    of rank ``text_encoder_rank`` and ``text_encoder_alpha`` (default: ``rank`` and ``alpha``) on
    ``text_encoder_targets`` (peft patterns over the encoder's module names; default CLIP's attention
    projections, as diffusers' scripts); ``text_encoder_lr`` their learning rate (default: the job's
    ``lr``; the schedule scales both alike). Captions are then encoded with gradients at every step,
    so ``job.cache_text_embeddings`` cannot be on."""

    rank: int = attrs.field(default=16, validator=v.gt(0))
    alpha: float | None = attrs.field(default=None, validator=v.optional(v.gt(0)))
    dropout: float = attrs.field(default=0.0, validator=[v.ge(0), v.lt(1)])
    target_modules: str | list[str] = attrs.field(default="attention-mlp", validator=_targets)
    init: bool | Literal["gaussian"] = True
    save_format: str = attrs.field(default="diffcore", validator=_lora_format)
    cond_dropout: float = attrs.field(default=0.0, validator=[v.ge(0), v.le(1)])
    train_text_encoder: bool = False
    text_encoder_rank: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))
    text_encoder_alpha: float | None = attrs.field(default=None, validator=v.optional(v.gt(0)))
    text_encoder_targets: list[str] = attrs.field(factory=lambda: list(TEXT_ENCODER_TARGETS), validator=_text_targets)
    text_encoder_lr: float | None = attrs.field(default=None, validator=v.optional(v.gt(0)))


def build_lora(config: LoraConfig, bundle: Any) -> Any:
    from diffcore.training.lora import LoraTrainer

    return LoraTrainer(config, bundle)


def _size(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (len(value) != 2 or any(not isinstance(x, int) or x <= 0 for x in value)):
        raise ConfigError(f"expected [height, width] in pixels, got {value!r}", path=attribute.name)


@attrs.frozen
class DreamBoothConfig(LoraConfig):
    """DreamBooth on the ``[dataset]``'s instance images: ``method`` ``lora`` (the LoRA fields above)
    or ``full``; ``instance_prompt`` for every instance image (unset: the dataset's captions);
    prior preservation with ``class_prompt``: ``num_class_images`` drawn by the base model into
    ``class_data`` (default: the run folder's ``class_images/``) at ``class_size`` [h, w],
    ``class_sampling_steps``, ``class_cfg`` (unset: the model's defaults), image i from seed
    ``class_seed + i``; the prior loss weighted by ``prior_preservation_weight``."""

    method: Literal["lora", "full"] = "lora"
    instance_prompt: str | None = None
    class_prompt: str | None = None
    num_class_images: int = attrs.field(default=100, validator=v.gt(0))
    prior_preservation_weight: float = attrs.field(default=1.0, validator=v.ge(0))
    class_data: str | None = None
    class_size: list[int] | None = attrs.field(default=None, validator=_size)
    class_sampling_steps: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))
    class_cfg: float | None = attrs.field(default=None, validator=v.optional(v.ge(0)))
    class_seed: int = attrs.field(default=0, validator=v.ge(0))


def build_dreambooth(config: DreamBoothConfig, bundle: Any) -> Any:
    from diffcore.training.dreambooth import DreamBoothTrainer

    return DreamBoothTrainer(config, bundle)


@attrs.frozen
class ControlNetConfig:
    """The ``controlnet`` trainer: ``conditioning`` names the component that makes each batch's
    conditioning images (``canny``, ``precomputed`` or a plugin's, e.g. ``depth``), with
    ``conditioning_options`` its config table; ``scale`` the residuals' factor while training;
    ``options`` go to the family's ``new_controlnet`` (FLUX.1: ``depth``, ``depth_single_blocks``);
    the objective's fields as ``full``'s, ``cond_dropout`` dropping captions only."""

    conditioning: str = "canny"
    conditioning_options: dict[str, Any] = attrs.Factory(dict)
    scale: float = attrs.field(default=1.0, validator=v.gt(0))
    options: dict[str, Any] = attrs.Factory(dict)
    timestep_sampling: Literal["uniform", "logit-normal", "shifted", "flux-shift"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = attrs.field(default=1.0, validator=v.gt(0))
    shift: float = attrs.field(default=1.0, validator=v.gt(0))
    cond_dropout: float = attrs.field(default=0.0, validator=[v.ge(0), v.le(1)])


def build_controlnet(config: ControlNetConfig, bundle: Any) -> Any:
    from diffcore.training.controlnet import ControlNetTrainer

    return ControlNetTrainer(config, bundle)


@attrs.frozen
class CannyConfig:
    """OpenCV's Canny hysteresis thresholds (``diffcore.nn.control.canny``); 100 / 200 is the usual pair."""

    low: float = attrs.field(default=100.0, validator=v.ge(0))
    high: float = attrs.field(default=200.0, validator=v.ge(0))


def build_canny(config: CannyConfig) -> Any:
    from diffcore.training.controlnet import CannyConditioning

    return CannyConditioning(config.low, config.high)


def build_precomputed(config: Any) -> Any:
    from diffcore.training.controlnet import precomputed

    return precomputed


def register_conditioning(register):
    from diffcore.registry import NoConfig

    register("canny", build_canny, config=CannyConfig,
             description="the Canny edges of each training image (OpenCV's algorithm), white on black")
    register("precomputed", build_precomputed, config=NoConfig,
             description="the dataset's own conditioning_image beside each image")


def register_trainers(register):
    register("full", build_full, config=FullConfig,
             description="full fine-tune of the network on its objective (flow / epsilon / v), label dropout for CFG")
    register("lora", build_lora, config=LoraConfig,
             description="low-rank adapters (peft) on the family's attention / MLP layers; base frozen, "
                         "checkpoints hold the adapters only")
    register("dreambooth", build_dreambooth, config=DreamBoothConfig,
             description="personalisation on a few instance images (LoRA or full), with prior preservation on "
                         "class images the base model draws first")
    register("controlnet", build_controlnet, config=ControlNetConfig,
             description="a ControlNet from the base network, trained on (image, caption, conditioning image); base frozen")
