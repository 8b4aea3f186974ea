"""FLUX.1 files to modules, in any supported layout, through ``diffcore.io.checkpoint.load_model``.

- a diffusers pipeline folder (``transformer/``, ``vae/``) or one component's folder: the shape
  comes from its ``config.json``;
- a single file or weights-only folder (BFL ``flux1-dev.safetensors`` / ``ae.safetensors``,
  ComfyUI ``model.diffusion_model.*``, diffusers keys): the variant is named, or detected from
  the tensor shapes (see ``convert.detect_variant``); the autoencoder's shape is read from its
  tensors.

Before anything is read, each file is checked: a truncated download, another model family's file
(FLUX.2, SDXL, SD3, a VAE where the transformer belongs) or a diffusers folder of another
pipeline is one line saying so.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from diffcore.api import (
    CheckpointError,
    checkpoint_files,
    load_model,
    read_config_json,
    tensor_shapes,
    vae_diffusers_config,
    vae_params_from_diffusers,
)
from diffcore.api import check_safetensors as core_check_safetensors
from diffcore.api import vae_params_from_shapes as core_vae_params_from_shapes
from diffcore_flux1.convert import detect_variant, fused_on_load, identify_foreign, infer_params, to_bfl
from diffcore_flux1.model import VARIANTS, Flux, FluxParams, params_from_diffusers_config
from diffcore_flux1.vae import AE_VARIANTS, AutoEncoder, AutoEncoderParams, vae_to_bfl


def check_safetensors(path: str | Path) -> None:
    """Every ``.safetensors`` file behind ``path`` is whole (the core's check: not empty, a header
    that parses, every byte it promises present), before anything is read."""
    for file in checkpoint_files(path):
        if file.suffix == ".safetensors":
            core_check_safetensors(file)


def component(path: Path, name: str) -> tuple[Path, dict | None]:
    """(weights location, diffusers config or None) for component ``name`` under ``path``; a
    diffusers folder of a pipeline other than FLUX.1's is refused by name."""
    index = path / "model_index.json" if path.is_dir() else None
    if index is not None and index.is_file():
        pipeline = read_config_json(index).get("_class_name", "")
        if pipeline.startswith("Flux2"):
            raise CheckpointError(f"{path} is a FLUX.2 pipeline ({pipeline}): load it with the flux2 family")
        if pipeline and not pipeline.startswith("Flux"):
            raise CheckpointError(f"{path} is a diffusers {pipeline} folder, not FLUX.1")
    if path.is_dir() and (path / name).is_dir():
        path = path / name
    config_file = path / "config.json" if path.is_dir() else None
    config = read_config_json(config_file) if config_file is not None and config_file.is_file() else None
    expected = {"transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL"}[name]
    found = (config or {}).get("_class_name", expected)
    if found != expected:
        hint = ": load it with the flux2 family" if found.startswith("Flux2") else ""
        raise CheckpointError(f"{path}: config.json describes a {found}, not FLUX.1's {expected}{hint}")
    return path, config



def transformer_params(path: str | Path, variant: str | None = None) -> tuple[str, FluxParams]:
    """(variant name, ``FluxParams``) of the transformer at ``path``. The sizes always come from the
    files (config.json, else a ``VARIANTS`` row matching the shapes, else the shapes themselves, so
    pruned or resized models load); ``variant`` names the role and defaults, and must fit the
    weights (Kontext-dev has dev's shapes, Depth-dev Canny-dev's: name them to get theirs).
    Without ``variant`` the role is read from the weights: dev, schnell, fill-dev or canny-dev."""
    if variant is not None and variant not in VARIANTS:
        raise CheckpointError(f"unknown FLUX.1 variant {variant!r}; known: {', '.join(VARIANTS)}")
    path, config = component(Path(path), "transformer")
    check_safetensors(path)
    shapes = tensor_shapes(path)
    foreign = identify_foreign(shapes)
    if foreign is not None:
        raise CheckpointError(f"{path}: not a FLUX.1 transformer: the keys are those of {foreign}")
    try:
        params = _sizes(shapes, config, variant)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    name = variant or next((k for k, row in VARIANTS.items() if row == params), None) or _role_name(params)
    _check_role(name, params, path)
    return name, params


def _sizes(shapes: Mapping[str, tuple[int, ...]], config: dict | None, variant: str | None) -> FluxParams:
    """The transformer's sizes: config.json's, else a ``VARIANTS`` row's, else the shapes'."""
    if config is not None:
        return params_from_diffusers_config(config)
    try:
        return VARIANTS[detect_variant(shapes)]
    except CheckpointError:
        # no row has these sizes; the RoPE axes (never stored) come from the named variant or a
        # row with the same head dim (FLUX.1's 128 -> (16, 56, 56))
        found = infer_params(shapes, axes_dim=(0,))
        head_dim = found.hidden_size // found.num_heads
        rows = [VARIANTS[variant]] if variant is not None else []
        axes = next((r.axes_dim for r in [*rows, *VARIANTS.values()] if r.hidden_size // r.num_heads == head_dim),
                    None)
        if axes is None:
            raise
        return infer_params(shapes, axes_dim=axes)


def _role(params: FluxParams) -> tuple[str, bool]:
    """What a transformer does, from its channels: text ("text"), control map ("control") or Fill
    ("fill") conditioning, and whether it is guidance-distilled."""
    extra = params.in_channels - params.out_channels
    return ("text" if extra == 0 else "control" if extra == params.out_channels else "fill"), params.guidance_embed


def _role_name(params: FluxParams) -> str:
    kind, guided = _role(params)
    return {"text": "dev" if guided else "schnell", "control": "canny-dev", "fill": "fill-dev"}[kind]


def _check_role(name: str, params: FluxParams, path: Path) -> None:
    if _role(VARIANTS[name]) != _role(params):
        found, guided = _role(params)
        raise CheckpointError(f"{path}: the weights are not FLUX.1 {name}: they take {params.in_channels} input "
                              f"channels ({found} conditioning) {'with' if guided else 'without'} a guidance "
                              f"embedding, which is {_role_name(params)}'s kind")


def load_transformer(path: str | Path, *, variant: str | None = None, params: FluxParams | None = None,
                     dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Flux:
    """The FLUX.1 transformer from ``path``; ``params`` > ``variant`` > config.json > detection."""
    weights, _ = component(Path(path), "transformer")
    if params is None:
        _, params = transformer_params(path, variant)
    else:
        check_safetensors(weights)
    return load_model(lambda: Flux(params), weights, rename=to_bfl, dtype=dtype, device=device,
                      copied=fused_on_load, denoiser=True).eval()


def vae_params_from_diffusers_config(config: dict) -> AutoEncoderParams:
    """FLUX.1's autoencoder from a diffusers ``config.json`` (FLUX.1's values fill what it omits)."""
    params = vae_params_from_diffusers({**vae_diffusers_config(AE_VARIANTS["flux1"]), **config})
    if params.quant_conv:
        raise CheckpointError(f"not a FLUX.1-style VAE config: it has quant convs (block_out_channels "
                              f"{config.get('block_out_channels')})")
    return params


def vae_params_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> AutoEncoderParams:
    """``AutoEncoderParams`` read off an autoencoder's tensor shapes (any layout); the latent
    scale and shift are not stored, so FLUX.1's are assumed."""
    flux1 = AE_VARIANTS["flux1"]
    params = core_vae_params_from_shapes(shapes, scale_factor=flux1.scale_factor, shift_factor=flux1.shift_factor)
    if params.quant_conv or params.batch_norm:
        raise CheckpointError("an autoencoder with quant convs (FLUX.2's or Stable Diffusion's), not FLUX.1's")
    return params


def load_vae(path: str | Path, *, variant: str | None = None, params: AutoEncoderParams | None = None,
             dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> AutoEncoder:
    """The FLUX.1 autoencoder from ``path`` (BFL ``ae.safetensors``, a diffusers ``vae/`` folder, ...):
    ``params`` > ``variant`` (``AE_VARIANTS``) > config.json > the tensor shapes."""
    path, config = component(Path(path), "vae")
    check_safetensors(path)
    if params is None and variant is not None:
        if variant not in AE_VARIANTS:
            raise CheckpointError(f"unknown FLUX.1 VAE variant {variant!r}; known: {', '.join(AE_VARIANTS)}")
        params = AE_VARIANTS[variant]
    if params is None:
        params = vae_params_from_diffusers_config(config) if config else vae_params_from_shapes(tensor_shapes(path))
    return load_model(lambda: AutoEncoder(params), path, rename=vae_to_bfl, dtype=dtype, device=device).eval()


__all__ = ["check_safetensors", "component", "load_transformer", "load_vae", "transformer_params",
           "vae_diffusers_config", "vae_params_from_diffusers_config", "vae_params_from_shapes"]
