"""Small stand-ins for the training tests: a class-conditional toy network and bundle, a toy
dataset, and settings built from the real ``TrainSettings``."""

from __future__ import annotations

from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import Dataset

from diffcore.jobs.train import TrainSettings
from diffcore.models import ModelBundle

SIZE, CLASSES = 4, 3


class TinyNet(nn.Module):
    """(x (B, 1, 4, 4), sigma (B,), y (B,)) -> (B, 1, 4, 4); class ``CLASSES`` is the null class."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.gradient_checkpointing = False
        self.y_embed = nn.Embedding(CLASSES + 1, hidden)
        self.inp = nn.Linear(SIZE * SIZE + 1, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, SIZE * SIZE)
        self.seen_dtypes: list[torch.dtype] = []

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            y = torch.full((x.shape[0],), CLASSES, dtype=torch.long, device=x.device)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        h = self.inp(torch.cat([x.flatten(1), sigma], dim=1))
        self.seen_dtypes.append(h.dtype)   # bfloat16 under autocast
        h = F.silu(self.norm(h + self.y_embed(y)))
        if self.gradient_checkpointing and torch.is_grad_enabled():
            h = checkpoint(self.mid, h, use_reentrant=False)
        else:
            h = self.mid(h)
        return self.out(F.silu(h)).view_as(x)


@attrs.define(eq=False)
class TinyBundle(ModelBundle):
    num_classes: int = CLASSES

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.network(x, sigma, y)

    def conditions(self, request: Any) -> dict[str, dict[str, Any]]:
        labels = torch.as_tensor(request.labels, dtype=torch.long)
        return {"cond": {"y": labels}, "uncond": {"y": torch.full_like(labels, CLASSES)}}

    def latent_shape(self, request: Any = None) -> tuple[int, int, int]:
        return (1, SIZE, SIZE)

    def training_inputs(self, batch: dict[str, torch.Tensor], *, dropout: float = 0.0,
                        generator: torch.Generator | None = None) -> dict[str, Any]:
        labels = batch["label"].long()
        if dropout <= 0:
            return {"y": labels}
        drop = torch.rand(labels.shape, generator=generator).to(labels.device) < dropout
        return {"y": torch.where(drop, torch.full_like(labels, CLASSES), labels)}


class ToyImages(Dataset):
    """``n`` fixed random images in [-1, 1] with labels ``i % CLASSES``."""

    def __init__(self, n: int = 24, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand((n, 1, SIZE, SIZE), generator=g) * 2 - 1
        self.labels = torch.arange(n) % CLASSES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i]}


class RegressionTrainer:
    """A trainer without randomness: the network maps (x, sigma = 0.5, y) to x. For checking the
    loop's arithmetic (accumulation, averaging across processes) exactly."""

    def __init__(self, bundle: ModelBundle):
        self.network = bundle.network

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.network.parameters())

    def loss(self, bundle: ModelBundle, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        x = batch["image"]
        sigma = torch.full((x.shape[0],), 0.5)
        return F.mse_loss(bundle.forward(x, sigma, y=batch["label"]).float(), x.float())


def tiny_bundle(seed: int = 0) -> TinyBundle:
    torch.manual_seed(seed)
    return TinyBundle(network=TinyNet())


def full_trainer(bundle: ModelBundle, **config: Any) -> Any:
    from diffcore.plugins import registry

    component = registry("trainers").get("full")
    return component.build(component.config(**config), bundle=bundle)


def settings(output_dir: Any, **changes: Any) -> TrainSettings:
    base = dict(output_dir=str(output_dir), device="cpu", seed=3, steps=6, batch_size=4, lr=1e-2,
                ema_decay=0.9, log_every=1, checkpoint_every=3, keep_last=5)
    return TrainSettings(**{**base, **changes})
