"""The FLUX.2 autoencoder (BFL flux2 ``autoencoder.py``): the core's LDM autoencoder
(``diffcore.nn.autoencoder``) with 32 latent channels and 1x1 quant convs. What the transformer
sees is the latent mean, patchified 2x2 into 128 channels (order c, ph, pw) and normalised with
the running statistics of ``bn`` (an affine-free BatchNorm2d, eps 1e-4): ``(p - mean) /
sqrt(var + eps)``; there is no scale / shift factor (0.3611 / 0.1159 are FLUX.1's). ``encode`` /
``decode`` include patchify and normalisation; diffusers' ``AutoencoderKLFlux2`` leaves both to
its pipelines. BFL's ``ae.safetensors`` keys are the module's own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffcore.api import AutoEncoder, CheckpointError, patchify, unpatchify, vae_to_ldm
from diffcore.api import vae_diffusers_to_ldm as ae_diffusers_to_bfl
from diffcore.api import vae_ldm_to_diffusers as ae_bfl_to_diffusers
from diffcore_flux2.params import AE_VARIANTS, AutoEncoderParams

__all__ = ["AutoEncoder", "AutoEncoderParams", "AE_VARIANTS", "patchify", "unpatchify",
           "ae_bfl_to_diffusers", "ae_diffusers_to_bfl", "ae_to_bfl"]


def ae_to_bfl(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Either layout -> BFL keys; the ``rename`` for ``load_model``. BFL's released file may lack
    ``bn.num_batches_tracked`` (a counter nothing reads): it is added as 0."""
    if not any(k.endswith("bn.running_mean") for k in state):
        raise CheckpointError("not a FLUX.2 autoencoder: no bn.running_mean (the latent statistics); "
                              "a FLUX.1 autoencoder has none")
    state = vae_to_ldm(state, what="a FLUX.2 autoencoder")
    state.setdefault("bn.num_batches_tracked", torch.zeros((), dtype=torch.long))
    return state
