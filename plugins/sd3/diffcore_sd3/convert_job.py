"""The ``sd3-convert`` job: an SD3 / SD3.5 MMDiT, in any layout the family loads (Stability's
single file with or without text encoders, ComfyUI's, bare original keys, a diffusers folder),
rewritten as an original-layout single file or a diffusers ``transformer/`` folder::

    [job]
    kind = "sd3-convert"
    input = "models/sd3.5_medium.safetensors"
    layout = "diffusers"                     # or "original"
    output_dir = "models/sd3.5-medium-diffusers"

``layout = "original"`` writes ``<output_dir>/<filename>`` (default ``sd3-<variant>.safetensors``)
with bare original keys; ``layout = "diffusers"`` writes ``transformer/`` with its ``config.json``,
so the folder loads in diffcore and in diffusers. Tensors keep their stored dtype unless
``dtype`` names one; files are written atomically. Importing this module is cheap.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from diffcore.api import ConvertSettings, JobContext, one_of, variant_of
from diffcore_sd3.params import VARIANTS

LAYOUTS = ("original", "diffusers")


@attrs.define
class SD3ConvertSettings(ConvertSettings):
    layout: str = attrs.field(default="diffusers", validator=one_of(LAYOUTS))
    variant: str = attrs.field(default="auto", validator=variant_of("SD3", VARIANTS))


@attrs.define(kw_only=True)
class ConvertJob:
    job: SD3ConvertSettings = attrs.Factory(SD3ConvertSettings)


def run_convert(config: ConvertJob, ctx: JobContext) -> dict[str, Path]:
    """Write the converted MMDiT under ``ctx.output_dir``; returns {"transformer": file}."""
    from diffcore.api import DIFFUSERS_WEIGHTS, cast_state, check_converted, load_state_dict, save_converted
    from diffcore_sd3.convert import original_to_diffusers, to_original
    from diffcore_sd3.load import component, transformer_params
    from diffcore_sd3.model import MMDiT, diffusers_config

    s, out = config.job, Path(ctx.output_dir)
    src = s.source("an SD3 MMDiT file or folder")
    variant, params = transformer_params(src, None if s.variant == "auto" else s.variant)
    weights, _ = component(src, "transformer")
    state = cast_state(to_original(load_state_dict(weights)), s.dtype)
    check_converted(state, lambda: MMDiT(params), weights, f"SD3 {variant}")
    if s.layout == "original":
        return {"transformer": save_converted(state, out / (s.filename or f"sd3-{variant}.safetensors"))}
    return {"transformer": save_converted(original_to_diffusers(state), out / "transformer" / DIFFUSERS_WEIGHTS,
                                          diffusers_config(params))}
