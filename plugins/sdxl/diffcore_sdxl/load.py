"""SDXL files to modules, in any supported layout, through ``diffcore.api.load_model``.

- a diffusers pipeline folder (``unet/``, ``vae/``, ``text_encoder(_2)/``) or one component's
  folder: the shape comes from its ``config.json`` (fp16 variants are used where they are the
  only weights);
- a single file: Stability's or ComfyUI's all-in-one checkpoint (``model.diffusion_model.*``,
  ``first_stage_model.*``, ``conditioner.embedders.*``), a UNet-only file in Stability's or
  diffusers' keys; fp16, bf16 or fp8 storage. The variant is named, or read from the shapes.

Before anything is read, each file is checked: a truncated download, another family's file
(FLUX, SD3, SD1.5) or a diffusers folder of another pipeline is one line saying so.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffcore.api import CheckpointError, check_safetensors, checkpoint_files, load_model, tensor_shapes, read_config_json
from diffcore_sdxl.convert import detect_variant, identify_foreign, infer_params, to_stability
from diffcore_sdxl.model import VARIANTS, UNet, UNetParams, params_from_diffusers_config

PIPELINES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"}
FOREIGN_PIPELINES = (("Flux2", "a FLUX.2 pipeline: load it with the flux2 family"),
                     ("Flux", "a FLUX.1 pipeline: load it with the flux1 family"),
                     ("StableDiffusion3", "an SD3 / SD3.5 pipeline, not SDXL"),
                     ("StableDiffusion", "a Stable Diffusion 1.x / 2.x pipeline (SD1.5-style): not supported"))


def check_files(path: str | Path) -> None:
    """Every ``.safetensors`` file behind ``path`` is whole (the core's header check: a truncated
    download is named as one)."""
    for file in checkpoint_files(path):
        if file.suffix == ".safetensors":
            check_safetensors(file)



def pipeline_class(path: Path) -> str | None:
    """The ``_class_name`` of a diffusers pipeline folder (None: not one); other families' are refused."""
    index = path / "model_index.json"
    if not (path.is_dir() and index.is_file()):
        return None
    name = read_config_json(index).get("_class_name", "")
    if name in PIPELINES:
        return name
    what = next((w for prefix, w in FOREIGN_PIPELINES if name.startswith(prefix)), f"a diffusers {name} folder")
    raise CheckpointError(f"{path}: {what} ({name}), not an SDXL one")


def weights_in(folder: Path) -> Path:
    """The weights of a diffusers component folder: the full-precision file (or index) if there is
    one, else the fp16 variant (``diffusion_pytorch_model.fp16.safetensors``)."""
    for pattern in ("*.safetensors.index.json", "*.safetensors", "*.bin"):
        found = sorted(folder.glob(pattern))
        full = [f for f in found if ".fp16." not in f.name]
        if len(full) == 1 or (not full and len(found) == 1):
            return (full or found)[0]
        if found:
            raise CheckpointError(f"{folder}: several weight files ({', '.join(f.name for f in found)}); "
                                  f"name the one to load")
    raise CheckpointError(f"{folder}: no *.safetensors or *.bin weights in this folder")


def component(path: Path, name: str) -> tuple[Path, dict | None]:
    """(weights file, diffusers config or None) of component ``name`` (``unet``, ``vae``, ...)
    under ``path``: a pipeline folder, the component's own folder, or a single file."""
    pipeline_class(path)
    if path.is_dir() and (path / name).is_dir():
        path = path / name
    if path.is_file():
        return path, None
    config = path / "config.json"
    return weights_in(path), read_config_json(config) if config.is_file() else None


def unet_params(path: str | Path, variant: str | None = None) -> tuple[str | None, UNetParams]:
    """(variant name or None, ``UNetParams``) of the UNet at ``path``; the sizes always come from the
    files (config.json, else a ``VARIANTS`` row matching the shapes, else the shapes themselves)."""
    if variant is not None and variant not in VARIANTS:
        raise CheckpointError(f"unknown SDXL variant {variant!r}; known: {', '.join(VARIANTS)}")
    weights, config = component(Path(path), "unet")
    check_files(weights)
    if config is not None and config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise CheckpointError(f"{weights.parent}: config.json describes a {config['_class_name']}, not SDXL's "
                              f"UNet2DConditionModel")
    if config is not None:
        try:
            params = params_from_diffusers_config(config)
        except ValueError as exc:
            raise CheckpointError(f"{weights.parent / 'config.json'}: {exc}") from None
        return variant or next((k for k, row in VARIANTS.items() if row == params), None), params
    shapes = tensor_shapes(weights)
    foreign = identify_foreign(shapes)
    if foreign is not None:
        raise CheckpointError(f"{weights}: not an SDXL UNet: the keys are those of {foreign}")
    try:
        found = detect_variant(shapes)
        params = VARIANTS[found] if found else infer_params(shapes)
    except CheckpointError as exc:
        raise CheckpointError(f"{weights}: {exc}") from None
    return variant or found, params


def load_unet(path: str | Path, *, params: UNetParams | None = None, dtype: torch.dtype | None = None,
              device: str | torch.device = "cpu") -> UNet:
    """The SDXL UNet from ``path``, any layout; ``params`` > config.json > the shapes."""
    weights, _ = component(Path(path), "unet")
    if params is None:
        _, params = unet_params(path)
    else:
        check_files(weights)
    return load_model(lambda: UNet(params), weights, rename=to_stability, dtype=dtype, device=device,
                      denoiser=True).eval()
