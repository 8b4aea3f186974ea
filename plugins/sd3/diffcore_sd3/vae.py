"""SD3's autoencoder: the core's LDM autoencoder (``diffcore.api.AutoEncoder``) with 16 latent
channels, no quant convs and the latent normalisation ``(z - 0.0609) * 1.5305`` (Stability's
``sd3_impls.SDVAE``; diffusers' ``scaling_factor`` / ``shift_factor``). Files: a diffusers
``vae/`` folder, or Stability's all-in-one file (``first_stage_model.*`` beside the MMDiT).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffcore.api import (
    AutoEncoder,
    AutoEncoderParams,
    CheckpointError,
    load_model,
    tensor_shapes,
    vae_params_from_diffusers,
    vae_params_from_shapes,
    vae_to_ldm,
)

SCALE, SHIFT = 1.5305, 0.0609   # not stored in checkpoints
SD3_VAE = AutoEncoderParams(z_channels=16, quant_conv=False, scale_factor=SCALE, shift_factor=SHIFT)


def vae_params(path: Path) -> AutoEncoderParams:
    """The autoencoder's shape at ``path`` (config.json, else the tensors), checked to be SD3's kind."""
    from diffcore_sd3.load import component

    weights, config = component(path, "vae")
    if config is not None:
        params = vae_params_from_diffusers(config)
    else:
        try:
            params = vae_params_from_shapes(tensor_shapes(weights), scale_factor=SCALE, shift_factor=SHIFT)
        except CheckpointError as exc:
            raise CheckpointError(f"{weights}: no SD3 autoencoder in it ({exc}); set vae to SD3's (a diffusers "
                                  f"vae/ folder or a file with first_stage_model.* keys)") from None
    if params.quant_conv or params.z_channels != 16 or params.batch_norm:
        raise CheckpointError(f"{weights}: an autoencoder with {params.z_channels} latent channels"
                              f"{' and quant convs' if params.quant_conv else ''}, not SD3's (16 channels, none): "
                              f"SDXL's and FLUX.2's autoencoders do not fit SD3")
    return params


def load_vae(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> AutoEncoder:
    """SD3's autoencoder from ``path``; its latents are normalised as the MMDiT reads them."""
    from diffcore_sd3.load import component

    path = Path(path)
    params = vae_params(path)
    weights, _ = component(path, "vae")
    return load_model(lambda: AutoEncoder(params), weights, rename=lambda sd: vae_to_ldm(sd, what="an SD3 VAE"),
                      dtype=dtype, device=device).eval()
