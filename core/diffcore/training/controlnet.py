"""The ``controlnet`` trainer: a ControlNet initialised from the base network (diffusers'
``train_controlnet*.py``: ``ControlNetModel.from_unet``, ``FluxControlNetModel.from_transformer``)
learns to steer it from (image, caption, conditioning image) triples; the base stays frozen.

The ControlNet becomes a submodule of ``bundle.network`` (``network.controlnet``), so the loop's
optimizer, EMA, checkpoints and exact resume carry it; ``state_dict`` / ``load_state_dict`` keep a
checkpoint's model file to the ControlNet where the loop asks the trainer what to save. Conditioning
images come from a ``conditioning`` component (``register_conditioning``): a callable from the
batch to (B, 3, H, W) in [-1, 1]; the core has ``canny`` (the edges of each ``image``, per step)
and ``precomputed`` (the dataset's ``conditioning_image``), a plugin adds e.g. ``depth``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffcore.errors import ConfigError, PluginError
from diffcore.nn.control import canny
from diffcore.training.objectives import TimestepSampler, diffusion_loss


class ControlNetTrainer:
    """Trains only ``bundle.network.controlnet`` (made by ``bundle.new_controlnet(**options)``) on the
    bundle's objective, with the residuals at ``scale``; ``cond_dropout`` drops captions (not the
    control image), as diffusers' ``proportion_empty_prompts``."""

    def __init__(self, config: Any, bundle: Any):
        self.config = config
        self.make_conditioning = conditioning_maker(config.conditioning, config.conditioning_options)
        network: nn.Module = bundle.network
        network.requires_grad_(False)
        if not hasattr(network, "controlnet"):
            network.add_module("controlnet", bundle.new_controlnet(**dict(config.options)))
        self.controlnet: nn.Module = network.controlnet
        self.controlnet.requires_grad_(True)
        self.timesteps = TimestepSampler(config.timestep_sampling, config.logit_mean, config.logit_std, config.shift)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.controlnet.parameters())

    def state_dict(self, network: nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint's model file holds: the ControlNet alone, as ``controlnet.*`` (the
        families' ControlNet loaders read such a file directly)."""
        return {f"controlnet.{k}": v for k, v in self.controlnet.state_dict().items()}

    def load_state_dict(self, network: nn.Module, saved: dict[str, torch.Tensor]) -> None:
        self.controlnet.load_state_dict({k.removeprefix("controlnet."): v for k, v in saved.items()
                                         if k.startswith("controlnet.")})

    def conditioning_image(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.make_conditioning(batch)

    def loss(self, bundle: Any, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        cond = bundle.training_inputs(batch, dropout=self.config.cond_dropout, generator=generator)
        cond.update(bundle.control_inputs(self.controlnet, self.conditioning_image(batch), scale=self.config.scale))
        return diffusion_loss(bundle, bundle.training_latents(batch), cond, generator, self.timesteps)


def conditioning_maker(name: str, options: dict[str, Any]) -> Any:
    """The ``conditioning`` component ``name`` built with ``options`` (its config table)."""
    from diffcore.config.structure import structure
    from diffcore.plugins import registry

    try:
        component = registry("conditioning").get(name)
    except PluginError as exc:
        raise ConfigError(str(exc), path="trainer.conditioning") from None
    try:
        config = structure(dict(options), component.config)
    except ConfigError as exc:
        raise ConfigError(exc.detail, path=f"trainer.conditioning_options{'.' + exc.path if exc.path else ''}") from None
    return component.factory(config)


class CannyConditioning:
    """The Canny edge map of each batch image, white on black in [-1, 1] (OpenCV's ``cv2.Canny``)."""

    def __init__(self, low: float = 100, high: float = 200):
        self.low, self.high = low, high

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        if "image" not in batch:
            raise ConfigError("conditioning = \"canny\" computes the edges of each batch's images, but this batch "
                              "holds cached latents only: turn the latent cache off or use \"precomputed\"",
                              path="trainer.conditioning")
        edges = torch.stack([canny(image.cpu(), self.low, self.high) for image in batch["image"]])
        return (edges.float() * 2 - 1)[:, None].expand(-1, 3, -1, -1).to(batch["image"].device)


def precomputed(batch: dict[str, Any]) -> torch.Tensor:
    """The dataset's ``conditioning_image`` (B, 3, H, W) in [-1, 1]."""
    if "conditioning_image" not in batch:
        raise ConfigError("conditioning = \"precomputed\" needs a dataset giving conditioning_image with each image "
                          "(or use conditioning = \"canny\")", path="trainer.conditioning")
    return batch["conditioning_image"]
