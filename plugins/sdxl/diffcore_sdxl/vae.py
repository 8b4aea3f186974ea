"""The SDXL autoencoder: the core's LDM ``AutoEncoder`` with 4 latent channels, quant convs and
latents scaled by 0.13025 (no shift), loaded from any layout; decoded in float32 where it would
overflow in float16, and in tiles for large images.

Why the upcast: SDXL's VAE has activations beyond float16's range in its decoder (diffusers marks
it ``force_upcast=True`` and runs it in float32 when the pipeline is float16; bfloat16 has
float32's range and needs nothing). A VAE finetuned to stay in range (madebyollin's
``sdxl-vae-fp16-fix`` says ``force_upcast: false``) runs in float16.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from diffcore.api import (AutoEncoder, AutoEncoderParams, CheckpointError, load_model, tensor_shapes,
                          vae_params_from_diffusers, vae_params_from_shapes, vae_to_ldm)

from diffcore_sdxl.load import check_files, component

SCALE = 0.13025
SDXL_VAE = AutoEncoderParams(z_channels=4, quant_conv=True, scale_factor=SCALE)


class SDXLVae(nn.Module):
    """``encode`` images in [-1, 1] to scaled latents (the posterior mean), ``decode`` back, in the
    autoencoder's own dtype; latents wider than ``tile`` decode in overlapping tiles."""

    def __init__(self, autoencoder: AutoEncoder, tile: int | None = None):
        super().__init__()
        self.autoencoder = autoencoder
        self.tile = tile

    @property
    def factor(self) -> int:
        return self.autoencoder.factor

    def _dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    def encode(self, images: Tensor) -> Tensor:
        return self.autoencoder.encode(images.to(self._dtype())).to(images.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        z = latents.to(self._dtype())
        if self.tile is not None:
            return self.autoencoder.decode_tiled(z, tile=self.tile, overlap=max(self.tile // 4, 1))
        return self.autoencoder.decode(z)


def vae_dtype(dtype: torch.dtype, force_upcast: bool) -> torch.dtype:
    """float32 for a float16 run of a VAE that overflows in float16; ``dtype`` otherwise."""
    return torch.float32 if dtype == torch.float16 and force_upcast else dtype


def vae_factor(path: str | Path) -> int:
    """The autoencoder's downsampling (8 for SDXL's), read from its config or shapes without loading it."""
    weights, config = component(Path(path), "vae")
    check_files(weights)
    params = vae_params_from_diffusers({"scaling_factor": SCALE, **config}) if config is not None else \
        vae_params_from_shapes(tensor_shapes(weights), scale_factor=SCALE)
    return 2 ** (len(params.ch_mult) - 1)


def load_vae(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             tile: int | None = None) -> SDXLVae:
    """The SDXL VAE from ``path``: a diffusers pipeline or ``vae/`` folder, a VAE file (Stability's
    ``sdxl_vae.safetensors`` or diffusers keys), or an all-in-one checkpoint (``first_stage_model.*``)."""
    weights, config = component(Path(path), "vae")
    check_files(weights)
    if config is not None:
        if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise CheckpointError(f"{weights.parent}: config.json describes a {config['_class_name']}, not SDXL's "
                                  f"AutoencoderKL")
        params = vae_params_from_diffusers({"scaling_factor": SCALE, **config})
        force_upcast = bool(config.get("force_upcast", True))
    else:
        params = vae_params_from_shapes(tensor_shapes(weights), scale_factor=SCALE)
        force_upcast = True
    if params.z_channels != 4 or not params.quant_conv:
        raise CheckpointError(f"{weights}: an autoencoder with {params.z_channels} latent channels "
                              f"{'with' if params.quant_conv else 'without'} quant convs; SDXL's has 4, with "
                              f"(a FLUX or SD3 VAE?)")
    target = vae_dtype(dtype, force_upcast)
    ae = load_model(lambda: AutoEncoder(params), weights, rename=vae_to_ldm, dtype=target, device=device)
    return SDXLVae(ae.eval(), tile=tile)


__all__ = ["SCALE", "SDXL_VAE", "SDXLVae", "load_vae", "vae_dtype", "vae_factor"]
