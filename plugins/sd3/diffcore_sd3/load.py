"""SD3 files to modules, in any supported layout, through ``diffcore.api.load_model``.

- a diffusers pipeline folder (``transformer/``, ``vae/``, ...) or one component's folder: the
  shape comes from its ``config.json``;
- a single file or weights-only folder: Stability's release files (``model.diffusion_model.*``
  beside ``first_stage_model.*`` and, in the ``incl_clips`` files, ``text_encoders.*``), ComfyUI's
  (the same prefix), bare original keys or diffusers keys; the variant is named or detected from
  the tensor shapes (``convert.detect_variant``). fp8-stored weights are upcast by the core loader.

Before anything is read, the keys are checked: another family's file (FLUX, SDXL, a VAE where
the transformer belongs) or a diffusers folder of another pipeline is one line saying so, and
the core's reader names a truncated file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffcore.api import CheckpointError, load_model, tensor_shapes, read_config_json
from diffcore_sd3.convert import detect_variant, fused_on_load, identify_foreign, infer_params, to_original
from diffcore_sd3.model import VARIANTS, MMDiT, SD3Params, params_from_diffusers_config

PIPELINES = ("StableDiffusion3",)   # StableDiffusion3Pipeline, ...Img2ImgPipeline, ...InpaintPipeline
OTHER_FAMILIES = {"Flux2": "flux2", "Flux": "flux1", "StableDiffusionXL": "sdxl"}


def component(path: Path, name: str) -> tuple[Path, dict | None]:
    """(weights location, diffusers config or None) for component ``name`` under ``path``; a
    diffusers folder of another pipeline is refused by name."""
    index = path / "model_index.json" if path.is_dir() else None
    if index is not None and index.is_file():
        pipeline = read_config_json(index).get("_class_name", "")
        if pipeline and not pipeline.startswith(PIPELINES):
            family = next((f for prefix, f in OTHER_FAMILIES.items() if pipeline.startswith(prefix)), None)
            hint = f": load it with the {family} family" if family else ""
            raise CheckpointError(f"{path} is a diffusers {pipeline} folder, not Stable Diffusion 3{hint}")
    if path.is_dir() and (path / name).is_dir():
        path = path / name
    config_file = path / "config.json" if path.is_dir() else None
    config = read_config_json(config_file) if config_file is not None and config_file.is_file() else None
    expected = {"transformer": "SD3Transformer2DModel", "vae": "AutoencoderKL"}[name]
    found = (config or {}).get("_class_name", expected)
    if found != expected:
        raise CheckpointError(f"{path}: config.json describes a {found}, not SD3's {expected}")
    return path, config



def transformer_params(path: str | Path, variant: str | None = None) -> tuple[str, SD3Params]:
    """(variant name, ``SD3Params``) of the MMDiT at ``path``. The sizes always come from the files
    (config.json, else a ``VARIANTS`` row matching the shapes, else the shapes themselves);
    ``variant`` names the role and defaults (SD3.5-large-turbo has large's shapes: name it)
    and must fit the weights."""
    if variant is not None and variant not in VARIANTS:
        raise CheckpointError(f"unknown SD3 variant {variant!r}; known: {', '.join(VARIANTS)}")
    path, config = component(Path(path), "transformer")
    shapes = tensor_shapes(path)
    foreign = identify_foreign(shapes)
    if foreign is not None:
        raise CheckpointError(f"{path}: not an SD3 / SD3.5 MMDiT: the keys are those of {foreign}")
    if config is not None:
        params = params_from_diffusers_config(config)
        detected = next((k for k, row in VARIANTS.items() if row == params), None)
    else:
        try:
            detected = detect_variant(shapes)
            params = VARIANTS[detected]
        except CheckpointError:
            detected, params = None, infer_params(shapes, num_heads=VARIANTS[variant].num_heads if variant else None)
    if variant is not None and detected is not None and VARIANTS[variant] != params:
        raise CheckpointError(f"{path}: the weights are SD3 {detected}, not {variant} (depth {params.depth}, width "
                              f"{params.hidden_size}, MMDiT-X blocks {list(params.dual_attention_layers)})")
    return variant or detected or "custom", params


def load_transformer(path: str | Path, *, variant: str | None = None, params: SD3Params | None = None,
                     dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> MMDiT:
    """The MMDiT from ``path``; ``params`` > ``variant`` > config.json > detection."""
    weights, _ = component(Path(path), "transformer")
    if params is None:
        _, params = transformer_params(path, variant)
    return load_model(lambda: MMDiT(params), weights, rename=to_original, dtype=dtype, device=device,
                      copied=fused_on_load, denoiser=True).eval()


__all__ = ["component", "load_transformer", "transformer_params"]
