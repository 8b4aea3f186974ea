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

from diffcore.api import ConfigError, JobContext, JobSettings, local_path, one_of, variant_of
from diffcore_sdxl.params import VARIANTS

LAYOUTS = ("stability", "diffusers")
DTYPES = ("keep", "bfloat16", "float16", "float32")
WEIGHTS = "diffusion_pytorch_model.safetensors"


@attrs.define
class ConvertSettings(JobSettings):
    input: str = attrs.field(default="", validator=local_path)
    layout: str = attrs.field(default="diffusers", validator=one_of(LAYOUTS))
    variant: str = attrs.field(default="auto", validator=variant_of("SDXL", VARIANTS))
    dtype: str = attrs.field(default="keep", validator=one_of(DTYPES))
    filename: str | None = None


@attrs.define(kw_only=True)
class ConvertJob:
    job: ConvertSettings = attrs.Factory(ConvertSettings)


def run_convert(config: ConvertJob, ctx: JobContext) -> dict[str, Path]:
    """Write the converted UNet under ``ctx.output_dir``; returns {"unet": file}."""
    import torch

    from diffcore.api import CheckpointError, cast_state, load_state_dict, save_converted
    from diffcore_sdxl.convert import STABILITY_PREFIX, to_diffusers, to_stability
    from diffcore_sdxl.load import component, unet_params
    from diffcore_sdxl.model import UNet, diffusers_config

    s = config.job
    if not s.input:
        raise ConfigError("set input to an SDXL UNet file or folder", path="job.input")
    src, out = Path(s.input).expanduser(), Path(ctx.output_dir)
    variant, params = unet_params(src, None if s.variant == "auto" else s.variant)
    variant = variant or "custom"
    weights, _ = component(src, "unet")
    state = cast_state(to_stability(load_state_dict(weights)), s.dtype)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in UNet(params).state_dict().items()}
    wrong = sorted(set(expected) ^ set(state)) + [k for k in expected if k in state and state[k].shape != expected[k]]
    if wrong:
        raise CheckpointError(f"{weights}: does not match the SDXL UNet {variant}: {len(wrong)} key(s) missing, "
                              f"unexpected or mis-shaped: {', '.join(wrong[:5])}")
    if s.layout == "stability":
        single = {f"{STABILITY_PREFIX}{k}": v for k, v in state.items()}
        return {"unet": save_converted(single, out / (s.filename or f"sdxl-{variant}.safetensors"))}
    return {"unet": save_converted(to_diffusers(state), out / "unet" / WEIGHTS, diffusers_config(params))}
