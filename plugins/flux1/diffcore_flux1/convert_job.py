"""The ``flux1-convert`` job: a FLUX.1 transformer, in any layout the family loads (BFL, ComfyUI,
diffusers, sharded), rewritten in one of the two layouts people exchange, and optionally its
autoencoder with it::

    [job]
    kind = "flux1-convert"
    input = "models/flux1-dev.safetensors"   # or a diffusers folder, a transformer/ folder
    vae = "models/ae.safetensors"            # optional
    layout = "diffusers"                     # or "bfl"
    output_dir = "models/flux1-dev-diffusers"

``layout = "bfl"`` writes ``<output_dir>/flux1-<variant>.safetensors`` (``filename``) and
``ae.safetensors``; ``layout = "diffusers"`` writes ``transformer/`` and ``vae/``, each with its
``config.json``, so the folder loads in diffcore and in diffusers. Tensors keep their stored dtype
unless ``dtype`` names one. Every file is written atomically (``save_file_atomic``). Importing
this module is cheap; ``run_convert`` imports torch.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from diffcore.api import ConvertSettings, JobContext, local_path, one_of, variant_of
from diffcore_flux1.params import VARIANTS

LAYOUTS = ("bfl", "diffusers")


@attrs.define
class FluxConvertSettings(ConvertSettings):
    layout: str = attrs.field(default="diffusers", validator=one_of(LAYOUTS))
    variant: str = attrs.field(default="auto", validator=variant_of("FLUX.1", VARIANTS))
    vae: str | None = attrs.field(default=None, validator=local_path)


@attrs.define(kw_only=True)
class ConvertJob:
    job: FluxConvertSettings = attrs.Factory(FluxConvertSettings)


def run_convert(config: ConvertJob, ctx: JobContext) -> dict[str, Path]:
    """Write the converted files under ``ctx.output_dir``; returns {"transformer": ..., "vae": ...}."""
    s, out = config.job, Path(ctx.output_dir)
    written = {"transformer": convert_transformer(s.source("a FLUX.1 transformer file or folder"), out, s)}
    if s.vae:
        written["vae"] = convert_vae(Path(s.vae).expanduser(), out, s)
    return written


def convert_transformer(src: Path, out: Path, s: FluxConvertSettings) -> Path:
    from diffcore.api import DIFFUSERS_WEIGHTS, CheckpointError, cast_state, check_converted, load_state_dict, \
        save_converted
    from diffcore_flux1.convert import bfl_to_diffusers, to_bfl
    from diffcore_flux1.load import component, transformer_params
    from diffcore_flux1.model import Flux, diffusers_config

    variant, params = transformer_params(src, None if s.variant == "auto" else s.variant)
    weights, _ = component(src, "transformer")
    state = cast_state(to_bfl(load_state_dict(weights)), s.dtype)
    check_converted(state, lambda: Flux(params), weights, f"FLUX.1 {variant or 'with these shapes'}")
    if s.layout == "bfl":
        return save_converted(state, out / (s.filename or f"flux1-{variant or 'custom'}.safetensors"))
    try:
        config = diffusers_config(params)
    except ValueError as exc:
        raise CheckpointError(f"{weights}: {exc}") from None
    return save_converted(bfl_to_diffusers(state), out / "transformer" / DIFFUSERS_WEIGHTS, config)


def convert_vae(src: Path, out: Path, s: FluxConvertSettings) -> Path:
    from diffcore.api import DIFFUSERS_WEIGHTS, cast_state, load_state_dict, save_converted, tensor_shapes
    from diffcore_flux1.load import check_safetensors, component, vae_diffusers_config, vae_params_from_shapes
    from diffcore_flux1.vae import vae_bfl_to_diffusers, vae_to_bfl

    weights, _ = component(src, "vae")
    check_safetensors(weights)
    params = vae_params_from_shapes(tensor_shapes(weights))
    state = cast_state(vae_to_bfl(load_state_dict(weights)), s.dtype)
    if s.layout == "bfl":
        return save_converted(state, out / "ae.safetensors")
    return save_converted(vae_bfl_to_diffusers(state), out / "vae" / DIFFUSERS_WEIGHTS, vae_diffusers_config(params))


