"""What a model family hands the core: a bundle of network, parametrisation and conditioning.

A family's factory (registered with ``register_models``) returns a ``ModelBundle``. The core's
jobs (generate, train) and the sampling engine use nothing else, so they work for any family.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import nn


@attrs.define(eq=False)
class ModelBundle:
    """Base class for families; override what applies."""

    network: nn.Module
    prediction_type: str = "flow"        # "flow" (velocity) | "epsilon" | "v"
    default_steps: int = 28
    default_schedule: dict[str, Any] = attrs.Factory(lambda: {"name": "flow"})
    # discrete-time models (epsilon / v): training sigmas indexed by timestep, e.g.
    # ``diffcore.sampling.schedules.ddpm_sigma_table()``; the denoiser then passes ``forward`` that
    # fractional timestep instead of sigma. None: the network takes sigma itself.
    sigma_table: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        """The network's raw prediction at noise level ``sigma`` (shape (batch,)) given conditioning.

        Called by the denoiser (``diffcore.sampling.denoisers``): flow models get ``x`` and sigma
        as they are; epsilon / v models get ``x / sqrt(sigma^2 + 1)`` and, with ``sigma_table``
        set, the fractional training timestep in place of sigma."""
        return self.network(x, sigma, **cond)

    def conditions(self, request: Any) -> dict[str, dict[str, Any]]:
        """Conditioning per branch key (``cond``, ``uncond``, ...) for a generation request."""
        raise NotImplementedError

    def latent_shape(self, request: Any) -> tuple[int, ...]:
        """Shape of one sample's initial noise."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in [-1, 1], (batch, channels, height, width)."""
        return latents

    def image_shape(self, request: Any) -> tuple[int, ...]:
        """(channels, height, width) of the images ``decode`` returns; pixel-space models: the latent shape."""
        return self.latent_shape(request)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to the latents ``decode`` inverts (img2img starts from these)."""
        return images

    def attention_alias(self, name: str) -> str:
        """Map another tool's layer name (diffusers' ``transformer_blocks.8.attn``) to ours."""
        return name

    # training
    def training_inputs(self, batch: dict[str, torch.Tensor], *, dropout: float = 0.0,
                        generator: torch.Generator | None = None) -> dict[str, Any]:
        """Conditioning kwargs for ``forward`` from a data batch; ``dropout`` is the rate at which
        the condition is replaced by the unconditional one (for classifier-free guidance)."""
        return {}


@attrs.define
class GenerationRequest:
    """What to generate, family-agnostic: class labels for class-conditional models, prompts for
    text-to-image ones; ``batch`` is the number of samples in this forward."""

    batch: int
    labels: torch.Tensor | None = None
    prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    height: int | None = None
    width: int | None = None
    extra: dict[str, Any] = attrs.Factory(dict)
