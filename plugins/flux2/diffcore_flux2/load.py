"""FLUX.2 files to modules: any layout (BFL, diffusers, ComfyUI), built on the meta device and
filled through ``diffcore.io.checkpoint.load_model`` so each weight exists once in memory (the
core checks every safetensors header before it reads, ``diffcore.io.headers``)."""

from __future__ import annotations

import os

import torch

from diffcore.api import CheckpointError, did_you_mean, load_model, tensor_shapes
from diffcore_flux2.convert import detect_variant, fused_on_load, meta_state, params_from_state, to_bfl
from diffcore_flux2.model import Flux2
from diffcore_flux2.params import AE_VARIANTS, VARIANTS, Flux2Params
from diffcore_flux2.vae import AutoEncoder, ae_to_bfl

PathLike = str | os.PathLike


def transformer_params(path: PathLike, variant: str | None = None) -> tuple[str | None, Flux2Params]:
    """(variant name or None, params) for the transformer file(s) at ``path``, from the tensor
    headers alone; ``variant`` forces a table row (a mismatch then fails at load with the keys)."""
    if variant is not None:
        if variant not in VARIANTS:
            raise CheckpointError(f"unknown FLUX.2 variant {variant!r}{did_you_mean(variant, VARIANTS)}; "
                                  f"known: {', '.join(VARIANTS)}")
        return variant, VARIANTS[variant]
    state = meta_state(tensor_shapes(path))
    try:
        params = params_from_state(state)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    try:
        name = detect_variant(state, hint=str(path))
    except CheckpointError:
        return None, params  # an unlisted size: its shapes are the whole description
    return name, VARIANTS[name]


def load_transformer(path: PathLike, *, variant: str | None = None, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu") -> Flux2:
    """A ``Flux2`` from a file, sharded index or folder in BFL, diffusers or ComfyUI layout."""
    _, params = transformer_params(path, variant)
    return load_model(lambda: Flux2(params), path, rename=to_bfl, dtype=dtype, device=device, copied=fused_on_load,
                      denoiser=True)


def load_ae(path: PathLike, *, variant: str = "flux2", dtype: torch.dtype | None = None,
            device: str | torch.device = "cpu") -> AutoEncoder:
    """The FLUX.2 autoencoder from BFL's ``ae.safetensors`` or a diffusers ``vae`` folder."""
    if variant not in AE_VARIANTS:
        raise CheckpointError(f"unknown FLUX.2 autoencoder {variant!r}; known: {', '.join(AE_VARIANTS)}")
    ae = load_model(lambda: AutoEncoder(AE_VARIANTS[variant]), path, rename=ae_to_bfl, dtype=dtype, device=device)
    return ae.eval()
