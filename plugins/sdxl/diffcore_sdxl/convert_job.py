"""The ``sdxl-convert`` job: an SDXL UNet (base, refiner, inpainting, finetunes), in any layout
the family loads (Stability's or ComfyUI's all-in-one file, a bare Stability UNet file, diffusers
keys, a diffusers folder), rewritten as a Stability-layout single file or a diffusers ``unet/``
folder::

    [job]
    kind = "sdxl-convert"
    input = "models/sd_xl_base_1.0.safetensors"
    layout = "diffusers"                     # or "stability"
    output_dir = "models/sdxl-base-diffusers"

``layout = "stability"`` writes ``<output_dir>/<filename>`` (default ``sdxl-<variant>.safetensors``)
with the UNet under ``model.diffusion_model.`` (what Stability's and ComfyUI's loaders read);
``layout = "diffusers"`` writes ``unet/`` with its ``config.json``, which loads in diffcore and in
diffusers. Only the UNet is converted (the VAE and text encoders of an all-in-one file are left
out). Tensors keep their stored dtype unless ``dtype`` names one; files are written atomically.
Importing this module is cheap.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from diffcore.api import ConvertSettings, JobContext, one_of, variant_of
from diffcore_sdxl.params import VARIANTS

LAYOUTS = ("stability", "diffusers")


@attrs.define
class SDXLConvertSettings(ConvertSettings):
    layout: str = attrs.field(default="diffusers", validator=one_of(LAYOUTS))
    variant: str = attrs.field(default="auto", validator=variant_of("SDXL", VARIANTS))


@attrs.define(kw_only=True)
class ConvertJob:
    job: SDXLConvertSettings = attrs.Factory(SDXLConvertSettings)


def run_convert(config: ConvertJob, ctx: JobContext) -> dict[str, Path]:
    """Write the converted UNet under ``ctx.output_dir``; returns {"unet": file}."""
    from diffcore.api import DIFFUSERS_WEIGHTS, cast_state, check_converted, load_state_dict, save_converted
    from diffcore_sdxl.convert import STABILITY_PREFIX, to_diffusers, to_stability
    from diffcore_sdxl.load import component, unet_params
    from diffcore_sdxl.model import UNet, diffusers_config

    s, out = config.job, Path(ctx.output_dir)
    src = s.source("an SDXL UNet file or folder")
    variant, params = unet_params(src, None if s.variant == "auto" else s.variant)
    variant = variant or "custom"
    weights, _ = component(src, "unet")
    state = cast_state(to_stability(load_state_dict(weights)), s.dtype)
    check_converted(state, lambda: UNet(params), weights, f"the SDXL UNet {variant}")
    if s.layout == "stability":
        single = {f"{STABILITY_PREFIX}{k}": v for k, v in state.items()}
        return {"unet": save_converted(single, out / (s.filename or f"sdxl-{variant}.safetensors"))}
    return {"unet": save_converted(to_diffusers(state), out / "unet" / DIFFUSERS_WEIGHTS, diffusers_config(params))}
