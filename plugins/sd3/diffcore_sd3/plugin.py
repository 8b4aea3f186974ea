"""diffcore plugin: the ``sd3`` model family, its ``sd3`` schedule preset, the ``slg`` guidance
processor and the ``sd3-convert`` job. Imports no torch; the factories do, when called.

Weights load from local files only: a diffusers SD3 folder (``model_index.json`` with
``transformer/``, ``vae/``, ``text_encoder(_2, _3)/``, ``tokenizer(_2, _3)/``), or a single
MMDiT file (Stability's release file, ComfyUI's, or diffusers keys) with ``vae`` and
``text_encoders`` set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from diffcore.api import DTYPES, ConfigError, FlowConfig, hookimpl, local_path, one_of, resolve_dtype, variant_of
from diffcore_sd3.params import DEFAULTS, VARIANTS

@attrs.frozen
class SD3Config:
    """``path``: diffusers folder or MMDiT file; ``vae`` / ``text_encoders`` override or complete
    it; ``clip_l`` / ``clip_g`` / ``t5xxl``: text encoders as single files (the tokenizers still
    come from ``text_encoders`` or the diffusers folder). ``variant = "auto"`` reads it from the
    shapes (sd3-medium, sd3.5-large, sd3.5-medium; name sd3.5-large-turbo, whose shapes are
    large's); it sets the step / CFG / shift defaults.
    ``text_encoder_3 = false`` runs without T5 (zeros in its place) and never loads it.
    ``max_sequence_length``: T5 tokens (256 as diffusers). ``dtype = "auto"``: bfloat16 on
    CUDA, float32 elsewhere."""

    variant: str = attrs.field(default="auto", validator=variant_of("SD3", VARIANTS))
    path: str = attrs.field(default="", validator=local_path)
    vae: str | None = attrs.field(default=None, validator=local_path)
    text_encoders: str | None = attrs.field(default=None, validator=local_path)
    clip_l: str | None = attrs.field(default=None, validator=local_path)   # single files (ComfyUI, kohya)
    clip_g: str | None = attrs.field(default=None, validator=local_path)
    t5xxl: str | None = attrs.field(default=None, validator=local_path)
    text_encoder_3: bool = True
    max_sequence_length: int = attrs.field(default=256, validator=attrs.validators.gt(0))
    dtype: str = attrs.field(default="auto", validator=one_of(DTYPES))


def build_sd3(config: SD3Config, device: Any = "cpu") -> Any:
    """An ``SD3Bundle`` computing on ``device`` from the local files ``config`` names. Every path
    is checked first; the MMDiT loads now, the text encoders and the autoencoder when first used
    (a training run on cached latents and text embeddings never loads them)."""
    from diffcore_sd3.bundle import SD3Bundle
    from diffcore_sd3.load import component, load_transformer, transformer_params
    from diffcore_sd3.text import FOLDERS, SD3TextEncoder
    from diffcore.api import fingerprint, single_files
    from diffcore_sd3.vae import load_vae, vae_params

    if not config.path:
        raise ConfigError("set path to a local SD3 diffusers folder or MMDiT .safetensors file", path="path")
    root = Path(config.path).expanduser()
    folder = root if root.is_dir() and (root / "transformer").is_dir() else None
    variant, params = transformer_params(root, None if config.variant == "auto" else config.variant)
    defaults = DEFAULTS.get(variant, DEFAULTS["sd3.5-large"])

    vae_path = Path(config.vae).expanduser() if config.vae else (folder / "vae" if folder else root)
    files = single_files(clip_l=config.clip_l, clip_g=config.clip_g,
                         t5xxl=config.t5xxl if config.text_encoder_3 else None)
    text_path = config.text_encoders or (folder if folder and (folder / "text_encoder").is_dir() else None)
    if text_path is None and files and folder is not None and (folder / "tokenizer").is_dir():
        text_path = folder
    if text_path is None:
        raise ConfigError(f"{root} has no text encoders: set text_encoders to a local diffusers SD3 folder "
                          f"(text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/, text_encoder_3/, tokenizer_3/; "
                          f"the tokenizer folders are enough for encoders given as files)", path="text_encoders")
    dtype = resolve_dtype(config.dtype, device)
    named = {"clip_l": "clip_l", "clip_g": "clip_g", "t5xxl": "t5"}   # [model] key -> FOLDERS name
    text_path = SD3TextEncoder.check_folder(Path(text_path).expanduser(), t5=config.text_encoder_3,
                                            files=[named[key] for key in files])
    ae = vae_params(vae_path)
    network = load_transformer(root, params=params, dtype=dtype, device=device)
    loaders = {"text": lambda: SD3TextEncoder.from_folder(text_path, t5=config.text_encoder_3,
                                                          max_length=config.max_sequence_length,
                                                          width=params.context_in_dim, dtype=dtype, device=device,
                                                          **files),
               "vae": lambda: load_vae(vae_path, dtype=dtype, device=device)}
    given = {named[key] for key in files}
    encoders = [*(text_path / d for name, pair in FOLDERS.items() if config.text_encoder_3 or name != "t5"
                  for d in (pair[1:] if name in given else pair)), *files.values()]
    identity = {"vae": fingerprint([component(vae_path, "vae")[0]], "sd3-vae", ae),
                "text": fingerprint(encoders, "sd3-text", config.max_sequence_length, params.context_in_dim)}
    return SD3Bundle(network=network, loaders=loaders, vae_factor=ae.factor, identity=identity, dtype=dtype,
                     device=device, default_cfg_scale=defaults.cfg_scale, default_sampling_steps=defaults.steps,
                     default_schedule={"name": "sd3", "shift": defaults.shift})


@attrs.frozen(kw_only=True)
class SD3ScheduleConfig(FlowConfig):
    """SD3's schedule: static shift 3 on the 1000-step training grid, as Stability's reference
    sampler and diffusers' FlowMatchEulerDiscreteScheduler space it (SD3-medium's reference runs
    shift 1: the variant defaults set it)."""

    shift: float = attrs.field(default=3.0, validator=attrs.validators.gt(0))
    train_steps: int = attrs.field(default=1000, validator=attrs.validators.ge(0))


@attrs.frozen
class SLGConfig:
    """``layers``: joint blocks skipped in the extra branch (diffusers' ``skip_guidance_layers``);
    ``scale``: the push away from it; ``start`` / ``stop``: the window, as fractions of the steps."""

    scale: float = 2.8
    layers: list[int] = attrs.field(default=[7, 8, 9], validator=attrs.validators.deep_iterable(
        attrs.validators.ge(0)))
    start: float = attrs.field(default=0.01, validator=[attrs.validators.ge(0), attrs.validators.le(1)])
    stop: float = attrs.field(default=0.2, validator=[attrs.validators.ge(0), attrs.validators.le(1)])


def build_slg(config: SLGConfig, **_: Any) -> Any:
    from diffcore_sd3.guidance import SkipLayerGuidance

    return SkipLayerGuidance(scale=config.scale, layers=tuple(config.layers), start=config.start, stop=config.stop)


@hookimpl
def register_models(register):
    register("sd3", build_sd3, config=SD3Config,
             description="Stable Diffusion 3 / 3.5 (Stability AI): SD3-medium, SD3.5 large / large-turbo / medium; "
                         "MMDiT, CLIP-L + CLIP-G + T5")


@hookimpl
def register_schedules(register):
    from diffcore.api import flow_schedule

    register("sd3", flow_schedule, config=SD3ScheduleConfig,
             description="SD3 / SD3.5: flow matching, static shift 3, on the reference sampler's grid")


@hookimpl
def register_guidance(register):
    register("slg", build_slg, config=SLGConfig,
             description="skip-layer guidance (SD3.5): push away from a forward with joint blocks 7, 8, 9 skipped")


@hookimpl
def register_jobs(register):
    from diffcore_sd3.convert_job import ConvertJob, run_convert

    register("sd3-convert", run_convert, config=ConvertJob,
             description="Rewrite an SD3 / SD3.5 MMDiT as an original-layout single file or a diffusers folder")
