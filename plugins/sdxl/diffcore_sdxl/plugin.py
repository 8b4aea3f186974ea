"""diffcore plugin: the ``sdxl`` model family. Imports no torch; ``build_sdxl`` does, when called.

Weights load from local files only: a diffusers SDXL folder (``model_index.json`` with ``unet/``,
``vae/``, ``text_encoder(_2)/``, ``tokenizer(_2)/``), or a UNet file (Stability's or ComfyUI's
all-in-one checkpoint, or a UNet alone, in Stability's or diffusers' keys) with ``text_encoders``
naming a diffusers SDXL folder (and ``vae`` set unless the file holds one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from diffcore.api import DTYPES, ConfigError, fingerprint, hookimpl, local_path, one_of, resolve_dtype, variant_of
from diffcore_sdxl.params import DEFAULTS, VARIANTS

PREDICTIONS = ("auto", "epsilon", "v")


def _pair(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (len(value) != 2 or any(int(v) != v or v < 0 for v in value)):
        raise ConfigError(f"{attribute.name} is [height, width] in pixels, got {value!r}", path=attribute.name)


@attrs.frozen
class RefinerConfig:
    """The refiner finishes what the base starts: the base denoises the first ``switch_at`` of the
    schedule (by timestep, diffusers' ``denoising_end``), the refiner the rest."""

    path: str = attrs.field(validator=local_path)
    switch_at: float = attrs.field(default=0.8, validator=[attrs.validators.gt(0), attrs.validators.lt(1)])
    text_encoders: str | None = attrs.field(default=None, validator=local_path)
    tokenizers: str | None = attrs.field(default=None, validator=local_path)


@attrs.frozen
class SDXLConfig:
    """``path``: a diffusers folder or UNet file; ``vae`` / ``text_encoders`` override or complete it.
    ``variant = "auto"`` reads it from the shapes. ``prediction_type = "auto"``: the folder's
    scheduler config, else epsilon (set "v" for v-prediction finetunes). ``dtype = "auto"``:
    bfloat16 on CUDA, float32 elsewhere. Micro-conditioning (``original_size``, ``crop_top_left``,
    ``target_size``, [height, width]) defaults to the output size and no crop, as diffusers;
    ``aesthetic_score`` / ``negative_aesthetic_score`` condition the refiner. ``vae_tile``: decode
    latents in tiles of this many latent pixels (large images on small memory). ``tokenizers``: a
    folder with ``tokenizer/`` and ``tokenizer_2/`` (any diffusers SDXL folder) that lets the text
    encoders inside an all-in-one ``path`` file be used (a file holds no tokenizers)."""

    variant: str = attrs.field(default="auto", validator=variant_of("SDXL", VARIANTS))
    path: str = attrs.field(default="", validator=local_path)
    vae: str | None = attrs.field(default=None, validator=local_path)
    text_encoders: str | None = attrs.field(default=None, validator=local_path)
    tokenizers: str | None = attrs.field(default=None, validator=local_path)
    dtype: str = attrs.field(default="auto", validator=one_of(DTYPES))
    prediction_type: str = attrs.field(default="auto", validator=one_of(PREDICTIONS))
    refiner: RefinerConfig | None = attrs.field(default=None, converter=lambda v: RefinerConfig(**v)
                                                if isinstance(v, dict) else v)
    original_size: tuple[int, int] | None = attrs.field(default=None, validator=_pair)
    crop_top_left: tuple[int, int] = attrs.field(default=(0, 0), validator=_pair)
    target_size: tuple[int, int] | None = attrs.field(default=None, validator=_pair)
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    vae_tile: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.gt(7)))


def _scheduler(folder: Path | None) -> dict[str, Any]:
    config = folder / "scheduler" / "scheduler_config.json" if folder is not None else None
    return json.loads(config.read_text()) if config is not None and config.is_file() else {}


def _expert(path: str, text_encoders: str | None, tokenizers: str | None, dtype: Any, device: Any, what: str,
            lazy: bool = False):
    """(UNet, text encoders (a loader of them when ``lazy``), the diffusers folder or None, the
    files the text encoders come from) of one SDXL model."""
    from diffcore.api import tensor_shapes
    from diffcore_sdxl.clip_keys import embedders
    from diffcore_sdxl.load import load_unet, unet_params
    from diffcore_sdxl.text import SDXLText

    root = Path(path).expanduser()
    folder = root if root.is_dir() and (root / "unet").is_dir() else None
    _, params = unet_params(root)
    text_path = text_encoders or (folder if folder is not None and (folder / "text_encoder_2").is_dir() else None)
    inside = root.is_file() and text_path is None and bool(embedders(tensor_shapes(root)))
    if inside and tokenizers is None:
        raise ConfigError(f"{root} holds its text encoders but no tokenizers: set {what}tokenizers to a folder with "
                          f"tokenizer/ and tokenizer_2/ (any diffusers SDXL folder), or {what}text_encoders to a "
                          f"local diffusers SDXL folder", path=f"{what}tokenizers")
    if text_path is None and not inside:
        raise ConfigError(f"{root} has no text encoders: set {what}text_encoders to a local diffusers SDXL folder "
                          f"(tokenizer/, text_encoder/, tokenizer_2/, text_encoder_2/)", path=f"{what}text_encoders")
    if inside:
        sources = [root, Path(tokenizers).expanduser()]

        def text() -> SDXLText:
            return SDXLText.from_single_file(root, sources[1], dtype=dtype, device=device)
    else:
        SDXLText.check_folder(text_path)
        sources = [Path(text_path) / d for d in ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
                   if (Path(text_path) / d).is_dir()]

        def text() -> SDXLText:
            return SDXLText.from_folder(text_path, dtype=dtype, device=device)

    return load_unet(root, params=params, dtype=dtype, device=device), text if lazy else text(), folder, sources


def build_sdxl(config: SDXLConfig, device: Any = "cpu") -> Any:
    """An ``SDXLBundle`` computing on ``device`` from the local files ``config`` names."""
    from diffcore_sdxl.bundle import Expert, MicroConditioning, SDXLBundle
    from diffcore_sdxl.load import component
    from diffcore_sdxl.vae import load_vae, vae_factor

    if not config.path:
        raise ConfigError("set path to a local SDXL diffusers folder or checkpoint .safetensors file", path="path")
    dtype = resolve_dtype(config.dtype, device)
    network, text, folder, text_files = _expert(config.path, config.text_encoders, config.tokenizers, dtype, device,
                                                "", lazy=True)
    root = Path(config.path).expanduser()
    vae_path = Path(config.vae).expanduser() if config.vae else (folder or root)
    factor = vae_factor(vae_path)
    loaders = {"text": text, "vae": lambda: load_vae(vae_path, dtype=dtype, device=device, tile=config.vae_tile)}
    vae_file = component(vae_path, "vae")[0]
    identity = {"vae": fingerprint([vae_file], "sdxl-vae", str(dtype)),
                "text": fingerprint(text_files, "sdxl-text", str(dtype))}
    scheduler = _scheduler(folder)
    prediction = config.prediction_type if config.prediction_type != "auto" else \
        {"v_prediction": "v"}.get(scheduler.get("prediction_type", "epsilon"), "epsilon")
    refiner = None
    if config.refiner is not None:
        r_net, r_text, _, _ = _expert(config.refiner.path, config.refiner.text_encoders, config.refiner.tokenizers,
                                      dtype, device, "refiner.")
        refiner = Expert(r_net, r_text, switch_t=round(1000 * (1 - config.refiner.switch_at)))
    variant = config.variant if config.variant != "auto" else "base-1.0"
    defaults = DEFAULTS[variant]
    micro = MicroConditioning(original_size=config.original_size, crop_top_left=tuple(config.crop_top_left),
                              target_size=config.target_size, aesthetic_score=config.aesthetic_score,
                              negative_aesthetic_score=config.negative_aesthetic_score)
    schedule = {"name": "ddpm", "spacing": scheduler.get("timestep_spacing", "leading"),
                "steps_offset": scheduler.get("steps_offset", 1)}
    return SDXLBundle(network=network, loaders=loaders, identity=identity, prediction_type=prediction,
                      default_sampling_steps=defaults.steps,
                      default_schedule=schedule, default_cfg_scale=defaults.cfg_scale, default_size=defaults.size,
                      latent_scale=factor, micro=micro, refiner=refiner)


@hookimpl
def register_models(register):
    register("sdxl", build_sdxl, config=SDXLConfig,
             description="Stable Diffusion XL base / refiner (Stability AI): UNet, CLIP-L + OpenCLIP bigG")


@hookimpl
def register_jobs(register):
    from diffcore_sdxl.convert_job import ConvertJob, run_convert

    register("sdxl-convert", run_convert, config=ConvertJob,
             description="Rewrite an SDXL UNet as a Stability-layout single file or a diffusers unet/ folder")
