"""FLUX.1 files to modules, in any supported layout, through ``diffcore.io.checkpoint.load_model``.

- a diffusers pipeline folder (``transformer/``, ``vae/``) or one component's folder: the shape
  comes from its ``config.json``;
- a single file or weights-only folder (BFL ``flux1-dev.safetensors`` / ``ae.safetensors``,
  ComfyUI ``model.diffusion_model.*``, diffusers keys): the variant is named, or detected from
  the tensor shapes (see ``convert.detect_variant``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffcore.errors import CheckpointError
from diffcore.io.checkpoint import load_model, tensor_shapes
from diffcore_flux1.convert import detect_variant, to_bfl
from diffcore_flux1.model import VARIANTS, Flux, FluxParams, params_from_diffusers_config
from diffcore_flux1.vae import AE_VARIANTS, AutoEncoder, AutoEncoderParams, vae_to_bfl


def _component(path: Path, name: str) -> tuple[Path, dict | None]:
    """(weights location, diffusers config or None) for component ``name`` under ``path``."""
    if path.is_dir() and (path / name).is_dir():
        path = path / name
    config = path / "config.json" if path.is_dir() else None
    return path, json.loads(config.read_text()) if config is not None and config.is_file() else None


def load_transformer(path: str | Path, *, variant: str | None = None, params: FluxParams | None = None,
                     dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Flux:
    """The FLUX.1 transformer from ``path``; ``params`` > ``variant`` > config.json > detection."""
    path, config = _component(Path(path), "transformer")
    if params is None and variant is not None:
        if variant not in VARIANTS:
            raise CheckpointError(f"unknown FLUX.1 variant {variant!r}; known: {', '.join(VARIANTS)}")
        params = VARIANTS[variant]
    if params is None:
        params = params_from_diffusers_config(config) if config else VARIANTS[detect_variant(tensor_shapes(path))]
    return load_model(lambda: Flux(params), path, rename=to_bfl, dtype=dtype, device=device).eval()


def vae_params_from_diffusers_config(config: dict) -> AutoEncoderParams:
    widths = list(config.get("block_out_channels", (128, 256, 512, 512)))
    if any(w % widths[0] for w in widths) or config.get("use_quant_conv") or config.get("use_post_quant_conv"):
        raise CheckpointError(f"not a FLUX.1-style VAE config (block_out_channels {widths}, quant convs "
                              f"{config.get('use_quant_conv')}/{config.get('use_post_quant_conv')})")
    return AutoEncoderParams(
        in_channels=config.get("in_channels", 3), out_ch=config.get("out_channels", 3), ch=widths[0],
        ch_mult=tuple(w // widths[0] for w in widths), num_res_blocks=config.get("layers_per_block", 2),
        z_channels=config.get("latent_channels", 16), scale_factor=config.get("scaling_factor", 0.3611),
        shift_factor=config.get("shift_factor", 0.1159))


def load_vae(path: str | Path, *, variant: str = "flux1", params: AutoEncoderParams | None = None,
             dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> AutoEncoder:
    """The FLUX.1 autoencoder from ``path`` (BFL ``ae.safetensors``, a diffusers ``vae/`` folder, ...)."""
    path, config = _component(Path(path), "vae")
    if params is None:
        if config is None and variant not in AE_VARIANTS:
            raise CheckpointError(f"unknown FLUX.1 VAE variant {variant!r}; known: {', '.join(AE_VARIANTS)}")
        params = vae_params_from_diffusers_config(config) if config else AE_VARIANTS[variant]
    return load_model(lambda: AutoEncoder(params), path, rename=vae_to_bfl, dtype=dtype, device=device).eval()
