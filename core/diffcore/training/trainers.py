"""Training methods (what is trained, and with which loss): the ``full`` fine-tune; ``lora`` and
``controlnet`` build on it (``training.lora``, ``training.controlnet``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffcore.training.objectives import TimestepSampler, diffusion_loss


class FullTrainer:
    """Trains every parameter of the bundle's network on its prediction type's objective.

    Conditioning comes from ``bundle.training_inputs``, which drops it at rate ``cond_dropout``
    so the model also learns the unconditional prediction classifier-free guidance needs
    (Ho & Salimans 2022, arXiv:2207.12598).
    """

    def __init__(self, config: Any, bundle: Any):
        self.config = config
        self.network: nn.Module = bundle.network
        self.network.requires_grad_(True)
        self.timesteps = self.timestep_sampler(config)

    @staticmethod
    def timestep_sampler(config: Any) -> TimestepSampler:
        return TimestepSampler(config.timestep_sampling, config.logit_mean, config.logit_std, config.shift)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]

    def loss(self, bundle: Any, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        cond = bundle.training_inputs(batch, dropout=self.config.cond_dropout, generator=generator)
        return diffusion_loss(bundle, bundle.training_latents(batch), cond, generator, self.timesteps)
