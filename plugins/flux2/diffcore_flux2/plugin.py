"""diffcore plugin: the ``flux2`` model family, its ``flux2`` schedule and FLUX.1's ``flux`` (the
same registration as the flux1 plugin's, so both installed is no clash). Imports no torch; the
factories do, when called.

Weights load from local files only: a diffusers FLUX.2 folder (``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``), or a single transformer file (BFL, ComfyUI or diffusers
keys) with ``vae`` (BFL's ``ae.safetensors`` or a diffusers ``vae/`` folder) and
``text_encoders`` (a diffusers folder holding ``text_encoder/`` and ``tokenizer/``) set; the
old name ``text_encoder`` still works, with a deprecation warning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from diffcore.api import (
    DTYPES,
    ConfigError,
    NoConfig,
    hookimpl,
    local_path,
    one_of,
    renamed_field,
    resolve_dtype,
    variant_of,
)
from diffcore_flux2.params import DEFAULTS, TEXT_ENCODERS, VARIANTS


@attrs.frozen
class Flux2Config:
    """``variant = "auto"`` reads it from the transformer's shapes; klein, klein-base and
    klein-9b-kv share them, so base is chosen when the diffusers folder's ``model_index.json``
    says ``"is_distilled": false`` or the path says "base", and klein-9b-kv when the folder's
    pipeline is ``Flux2KleinKVPipeline`` or the path says "kv". ``guidance``: dev's embedded guidance
    (default 4.0), or klein-base's default true-CFG scale (4.0, against the empty prompt; the
    job's ``cfg_scale`` overrides it); distilled klein runs one forward at a fixed 1.0.
    ``reference_max_pixels``: unset for BFL's caps on reference images (2024^2 for one, 1024^2
    each for several); 1048576 matches diffusers' pipelines, which cap every reference at 1024^2.
    ``train_guidance``: the embedded guidance dev trains at (1.0, diffusers' and SimpleTuner's
    FLUX default; klein embeds none)."""

    variant: str = attrs.field(default="auto", validator=variant_of("FLUX.2", VARIANTS))
    path: str = attrs.field(default="", validator=local_path)
    vae: str | None = attrs.field(default=None, validator=local_path)
    text_encoders: str | None = attrs.field(default=None, validator=local_path)
    dtype: str = attrs.field(default="auto", validator=one_of(DTYPES))   # auto: bfloat16 on CUDA, float32 elsewhere
    guidance: float | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(0)))
    max_sequence_length: int = attrs.field(default=512, validator=attrs.validators.gt(0))
    reference_max_pixels: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(64 * 64)))
    train_guidance: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    text_encoder: str | None = attrs.field(default=None, validator=local_path)  # deprecated: text_encoders

    def __attrs_post_init__(self) -> None:
        renamed_field(self, "text_encoder", "text_encoders")


def build_flux2(config: Flux2Config, device: Any = "cpu") -> Any:
    """A ``Flux2Bundle`` on ``device`` from the local files ``config`` names. Every path is checked
    first; the transformer loads now, the autoencoder and text encoder when first used (a training
    run on cached latents and text embeddings never loads them)."""
    from diffcore_flux2.bundle import Flux2Bundle
    from diffcore_flux2.load import load_ae, load_transformer, transformer_params
    from diffcore_flux2.params import AE_VARIANTS
    from diffcore_flux2.text import Flux2TextEncoder, TextSpec
    from diffcore.api import fingerprint

    if not config.path:
        raise ConfigError("set path to a local FLUX.2 diffusers folder or transformer .safetensors file", path="path")
    dtype = resolve_dtype(config.dtype, device)
    root = Path(config.path).expanduser()
    folder = root if root.is_dir() and (root / "transformer").is_dir() else None
    weights = folder / "transformer" if folder else root
    variant, _ = transformer_params(weights, None if config.variant == "auto" else config.variant)
    if variant is None:
        raise ConfigError(f"{weights}: its shapes match no FLUX.2 variant; set variant to one of "
                          f"{', '.join(VARIANTS)}", path="variant")
    if config.variant == "auto" and folder is not None:
        variant = _from_model_index(folder, variant)
    steps, guidance, cfg_scale = sampling_defaults(variant, config.guidance)

    vae_path = config.vae or (folder / "vae" if folder and (folder / "vae").is_dir() else None)
    if vae_path is None:
        raise ConfigError(f"{root} has no vae/ folder: set vae to FLUX.2's ae.safetensors", path="vae")
    ae = "tiny" if variant.startswith("tiny") else "flux2"
    text_path = config.text_encoders or (folder if folder and (folder / "text_encoder").is_dir() else None)
    if text_path is None:
        raise ConfigError(f"{root} has no text encoder: set text_encoders to a local diffusers FLUX.2 folder "
                          f"(text_encoder/, tokenizer/)", path="text_encoders")
    text_path = Flux2TextEncoder.check_folder(Path(text_path).expanduser())
    spec = TextSpec(*TEXT_ENCODERS[variant])
    vae_path = Path(vae_path).expanduser()

    network = load_transformer(weights, variant=variant, dtype=dtype, device=device)
    loaders = {"vae": lambda: load_ae(vae_path, variant=ae, dtype=dtype, device=device),
               "text": lambda: Flux2TextEncoder.from_folder(text_path, spec, max_length=config.max_sequence_length,
                                                            dtype=dtype, device=device)}
    identity = {"vae": fingerprint([vae_path], "flux2-ae", ae),
                "text": fingerprint([text_path / d for d in ("text_encoder", "tokenizer")], "flux2-text", spec,
                                    config.max_sequence_length)}
    return Flux2Bundle(network=network.eval(), loaders=loaders, vae_downscale=AE_VARIANTS[ae].downscale,
                       identity=identity, default_sampling_steps=steps, default_schedule={"name": "flux2"},
                       guidance=guidance, default_cfg_scale=cfg_scale, train_guidance=config.train_guidance,
                       reference_max_pixels=config.reference_max_pixels,
                       reference_cache=DEFAULTS[variant].reference_cache)


def sampling_defaults(variant: str, guidance: float | None = None) -> tuple[int, float, float]:
    """(steps, embedded guidance, CFG scale) by BFL's CLI defaults: dev 50 steps at embedded
    guidance 4.0, one forward; klein 4 steps, one forward (guidance fixed at 1.0); klein-base
    50 steps with true CFG 4.0. ``guidance`` overrides the embedded guidance or the CFG scale."""
    defaults = DEFAULTS[variant]
    if guidance is not None and not (VARIANTS[variant].guidance_embed or defaults.true_cfg) \
            and guidance != defaults.guidance:
        raise ConfigError(f"FLUX.2 {variant} is guidance-distilled and runs at guidance {defaults.guidance}; "
                          f"got {guidance} (leave guidance unset)", path="guidance")
    guidance = defaults.guidance if guidance is None else guidance
    return defaults.steps, guidance, guidance if defaults.true_cfg else 1.0


def _from_model_index(folder: Path, variant: str) -> str:
    """A diffusers klein folder tells what the shapes cannot in ``model_index.json``:
    ``"is_distilled": false`` is klein-base, the ``Flux2KleinKVPipeline`` class is klein-9b-kv."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return variant
    if not isinstance(index, dict):
        return variant
    if index.get("_class_name") == "Flux2KleinKVPipeline":
        return {"klein-9b": "klein-9b-kv", "tiny-klein": "tiny-klein-kv"}.get(variant, variant)
    if index.get("is_distilled") is False:
        return {"klein-4b": "klein-base-4b", "klein-9b": "klein-base-9b"}.get(variant, variant)
    return variant


def flux2_schedule(config: NoConfig, **_: Any) -> Any:
    from diffcore_flux2.bundle import Flux2Timer

    return Flux2Timer(config)


@hookimpl
def register_models(register):
    register("flux2", build_flux2, config=Flux2Config,
             description="FLUX.2 dev / klein / klein-base / klein-9b-kv (Black Forest Labs): rectified-flow DiT, "
                         "LLM text encoder")


@hookimpl
def register_schedules(register):
    from diffcore.api import DynamicShiftConfig, flow_schedule

    register("flux2", flux2_schedule, config=NoConfig,
             description="FLUX.2: flow matching shifted by BFL's empirical mu (image tokens and step count)")
    register("flux", flow_schedule, config=DynamicShiftConfig,
             description="FLUX.1: flow matching shifted by image size (mu from 0.5 at 256 to 1.15 at 4096 tokens)")
