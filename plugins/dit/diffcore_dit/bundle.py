"""What the DiT family hands the core: a pixel-space, class-conditional flow model."""

from __future__ import annotations

import re
from typing import Any

import attrs
import torch

from diffcore.api import ConfigError, GenerationRequest, ModelBundle


@attrs.define(eq=False)
class DiTBundle(ModelBundle):
    """``network`` is a ``DiT2D``; conditioning is a class label, the null class is ``num_classes``."""

    @property
    def num_classes(self) -> int:
        return self.network.params.num_classes

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.network(x, sigma, y)

    def conditions(self, request: GenerationRequest) -> dict[str, dict[str, Any]]:
        """``request.labels`` (one per sample; one label is repeated to ``request.batch``); no labels
        means unconditional samples, the null class in both branches."""
        labels, batch = request.labels, request.batch
        device = self.network.pos.device
        if labels is None:
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
            return {"cond": {"y": labels}, "uncond": {"y": labels.clone()}}
        labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(batch).clone()
        if labels.numel() != batch:
            raise ConfigError(f"{labels.numel()} class labels for a batch of {batch}", path="labels")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ConfigError(f"class label {bad[0].item()} is out of range: this DiT has {self.num_classes} "
                              f"classes (0..{self.num_classes - 1})", path="labels")
        return {"cond": {"y": labels}, "uncond": {"y": torch.full_like(labels, self.num_classes)}}

    def latent_shape(self, request: GenerationRequest | None = None) -> tuple[int, int, int]:
        p = self.network.params
        for side in ("height", "width"):
            value = getattr(request, side, None)
            if value not in (None, p.image_size):
                raise ConfigError(f"this DiT makes {p.image_size}x{p.image_size} images, the request asks for "
                                  f"{side} {value}", path=side)
        return (p.in_channels, p.image_size, p.image_size)

    def seq_len(self, request: GenerationRequest) -> int:
        """Patch tokens: (image_size / patch)^2."""
        return self.network.params.tokens

    def pooled_condition(self, cond: dict[str, Any]) -> torch.Tensor | None:
        """The class labels (the null class ``num_classes`` in the unconditional branch)."""
        return cond.get("y")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents  # pixel space, already in [-1, 1]

    def attention_alias(self, name: str) -> str:
        """diffusers' ``transformer_blocks.8.attn1`` is our ``blocks.8.attn``."""
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.attn1?", name)
        return f"blocks.{m.group(1)}.attn" if m else name

    def training_inputs(self, batch: dict[str, torch.Tensor], *, dropout: float = 0.0,
                        generator: torch.Generator | None = None) -> dict[str, Any]:
        """``{"y": labels}`` with each label replaced by the null class with probability ``dropout``."""
        labels = batch["label"].long()
        if dropout <= 0.0:
            return {"y": labels}
        device = generator.device if generator is not None else labels.device
        drop = torch.rand(labels.shape, generator=generator, device=device).to(labels.device) < dropout
        return {"y": torch.where(drop, torch.full_like(labels, self.num_classes), labels)}
