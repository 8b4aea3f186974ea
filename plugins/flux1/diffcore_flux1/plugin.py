"""diffcore plugin: the ``flux1`` model family, its ``flux`` schedule and the ``flux1-convert``
job. Imports no torch; ``build_flux1`` and the job do, when called.

Weights load from local files only: a diffusers FLUX.1 folder (``model_index.json`` with
``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``text_encoder_2/``,
``tokenizer_2/``), or a single transformer file (BFL ``flux1-dev.safetensors``, ComfyUI, or
diffusers keys) with BFL's ``ae.safetensors`` next to it (or ``vae`` set) and ``text_encoders``
(a diffusers folder) set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from diffcore.api import DTYPES, ConfigError, hookimpl, local_path, one_of, resolve_dtype, variant_of
from diffcore_flux1.params import DEFAULTS, VARIANTS

OFFLOAD = ("none", "model", "sequential")  # diffcore.nn.offload.MODES, without importing torch
BFL_AE = "ae.safetensors"


@attrs.frozen
class Flux1Config:
    """``path``: diffusers folder or transformer file; ``vae`` / ``text_encoders`` override or
    complete it; ``clip_l`` / ``t5xxl``: text encoders as single files (the tokenizers still come
    from ``text_encoders`` or the diffusers folder). ``variant = "auto"`` reads it from the shapes (dev, schnell, fill-dev,
    canny-dev; name kontext-dev and depth-dev, whose shapes are dev's and canny-dev's); it sets
    the defaults below. ``guidance``: the embedded guidance (variant default: dev 3.5, Kontext
    2.5, Fill 30). ``dtype = "auto"``: bfloat16 on CUDA, float32 elsewhere. ``offload``: see
    ``diffcore.nn.offload``. ``resize_references``: snap Kontext references to the nearest
    training resolution (BFL, diffusers)."""

    variant: str = attrs.field(default="auto", validator=variant_of("FLUX.1", VARIANTS))
    path: str = attrs.field(default="", validator=local_path)
    vae: str | None = attrs.field(default=None, validator=local_path)
    text_encoders: str | None = attrs.field(default=None, validator=local_path)
    clip_l: str | None = attrs.field(default=None, validator=local_path)   # single files (ComfyUI, kohya)
    t5xxl: str | None = attrs.field(default=None, validator=local_path)
    dtype: str = attrs.field(default="auto", validator=one_of(DTYPES))
    offload: str = attrs.field(default="none", validator=one_of(OFFLOAD))
    guidance: float | None = None
    max_sequence_length: int | None = attrs.field(default=None)  # T5 tokens: 512, schnell 256
    resize_references: bool = True
    train_guidance: float = 3.5   # the embedded guidance dev-like variants train at


def build_flux1(config: Flux1Config, device: Any = "cpu") -> Any:
    """A ``FluxBundle`` computing on ``device`` from the local files ``config`` names. Paths and
    files are checked before anything loads; then the transformer loads, and the text encoders
    and autoencoder on first use (a run on cached latents and text never reads them)."""
    from diffcore.api import Offload, fingerprint, single_files
    from diffcore_flux1.bundle import FluxBundle
    from diffcore_flux1.load import check_safetensors, load_transformer, load_vae, transformer_params
    from diffcore_flux1.text import FluxTextEncoder

    if not config.path:
        raise ConfigError("set path to a local FLUX.1 diffusers folder or transformer .safetensors file", path="path")
    root = Path(config.path).expanduser()
    folder = root if root.is_dir() and (root / "transformer").is_dir() else None
    variant, params = transformer_params(root, None if config.variant == "auto" else config.variant)
    defaults = DEFAULTS[variant]

    vae_path = Path(config.vae).expanduser() if config.vae else None
    if vae_path is None and folder is not None and (folder / "vae").is_dir():
        vae_path = folder / "vae"
    if vae_path is None and root.is_file() and (root.parent / BFL_AE).is_file():
        vae_path = root.parent / BFL_AE
    if vae_path is None:
        where = f"no {BFL_AE} next to {root}" if root.is_file() else f"{root} has no vae/ folder"
        raise ConfigError(f"{where}: set vae to FLUX.1's autoencoder ({BFL_AE} or a diffusers vae/ folder)",
                          path="vae")
    check_safetensors(vae_path / "vae" if (vae_path / "vae").is_dir() else vae_path)
    text_path = config.text_encoders or (folder if folder and (folder / "text_encoder").is_dir() else None)
    if text_path is None and (config.clip_l or config.t5xxl) and folder is not None and (folder / "tokenizer").is_dir():
        text_path = folder
    if text_path is None:
        raise ConfigError(f"{root} has no text encoders: set text_encoders to a local diffusers FLUX.1 folder "
                          f"(text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/; with clip_l and t5xxl set, "
                          f"tokenizer/ and tokenizer_2/ are enough)", path="text_encoders")
    files = single_files(clip_l=config.clip_l, t5xxl=config.t5xxl)

    dtype = resolve_dtype(config.dtype, device)
    offload = Offload(config.offload, device)
    max_length = config.max_sequence_length or defaults.max_sequence_length
    network = offload.add("network", load_transformer(root, params=params, dtype=dtype, device=offload.storage))
    text_path = FluxTextEncoder.check_folder(Path(text_path).expanduser(), clip_l="clip_l" in files,
                                             t5xxl="t5xxl" in files)
    loaders = {"text": lambda: offload.add("text", FluxTextEncoder.from_folder(
                   text_path, max_length=max_length, dtype=dtype, device=offload.storage, **files)),
               "vae": lambda: offload.add("vae", load_vae(vae_path, dtype=dtype, device=offload.storage))}
    replaced_by = {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"}
    text_files = [*(text_path / d for d in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
                    if replaced_by.get(d) not in files), *files.values()]
    identity = {"vae": fingerprint([vae_path], "flux1-ae"),
                "text": fingerprint([f for f in text_files if f.exists()], "flux1-text", max_length)}
    return FluxBundle(network=network, loaders=loaders, identity=identity, offload=offload, dtype=dtype,
                      guidance=config.guidance if config.guidance is not None else defaults.guidance,
                      train_guidance=config.train_guidance,
                      default_sampling_steps=defaults.steps,
                      default_schedule={"name": "flux" if defaults.shift else "flow"},
                      resize_references=config.resize_references)


@hookimpl
def register_models(register):
    register("flux1", build_flux1, config=Flux1Config,
             description="FLUX.1 dev / schnell / Kontext / Fill / Canny / Depth (Black Forest Labs): MMDiT, T5 + CLIP")


@hookimpl
def register_schedules(register):
    from diffcore.api import DynamicShiftConfig, flow_schedule

    register("flux", flow_schedule, config=DynamicShiftConfig,
             description="FLUX.1: flow matching shifted by image size (mu from 0.5 at 256 to 1.15 at 4096 tokens)")


@hookimpl
def register_jobs(register):
    from diffcore_flux1.convert_job import ConvertJob, run_convert

    register("flux1-convert", run_convert, config=ConvertJob,
             description="Rewrite a FLUX.1 transformer (and autoencoder) as a BFL single file or a diffusers folder")
