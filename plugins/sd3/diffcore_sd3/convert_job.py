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

from diffcore.api import ConfigError, JobContext, JobSettings, local_path, one_of, variant_of
from diffcore_sd3.params import VARIANTS

LAYOUTS = ("original", "diffusers")
DTYPES = ("keep", "bfloat16", "float16", "float32")
WEIGHTS = "diffusion_pytorch_model.safetensors"


@attrs.define
class ConvertSettings(JobSettings):
    input: str = attrs.field(default="", validator=local_path)
    layout: str = attrs.field(default="diffusers", validator=one_of(LAYOUTS))
    variant: str = attrs.field(default="auto", validator=variant_of("SD3", VARIANTS))
    dtype: str = attrs.field(default="keep", validator=one_of(DTYPES))
    filename: str | None = None


@attrs.define(kw_only=True)
class ConvertJob:
    job: ConvertSettings = attrs.Factory(ConvertSettings)


def run_convert(config: ConvertJob, ctx: JobContext) -> dict[str, Path]:
    """Write the converted MMDiT under ``ctx.output_dir``; returns {"transformer": file}."""
    import torch

    from diffcore.api import CheckpointError, cast_state, load_state_dict, save_converted
    from diffcore_sd3.convert import original_to_diffusers, to_original
    from diffcore_sd3.load import component, transformer_params
    from diffcore_sd3.model import MMDiT, diffusers_config

    s = config.job
    if not s.input:
        raise ConfigError("set input to an SD3 MMDiT file or folder", path="job.input")
    src, out = Path(s.input).expanduser(), Path(ctx.output_dir)
    variant, params = transformer_params(src, None if s.variant == "auto" else s.variant)
    weights, _ = component(src, "transformer")
    state = cast_state(to_original(load_state_dict(weights)), s.dtype)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in MMDiT(params).state_dict().items()}
    wrong = sorted(set(expected) ^ set(state)) + [k for k in expected if k in state and state[k].shape != expected[k]]
    if wrong:
        raise CheckpointError(f"{weights}: does not match SD3 {variant}: {len(wrong)} key(s) missing, unexpected or "
                              f"mis-shaped: {', '.join(wrong[:5])}")
    if s.layout == "original":
        return {"transformer": save_converted(state, out / (s.filename or f"sd3-{variant}.safetensors"))}
    return {"transformer": save_converted(original_to_diffusers(state), out / "transformer" / WEIGHTS,
                                  diffusers_config(params))}

