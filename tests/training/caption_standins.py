"""A tiny text-to-image stand-in for captioned data and caches: a 1x1-conv network on any size,
an autoencoder that average-pools 4x4, a word-hash text encoder. The autoencoder and the
encoder load lazily, as FLUX.2's and SD3's do, and count their loads and calls, so a test can
assert that a cached run never touched them."""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from diffcore.errors import ConfigError
from diffcore.models import ModelBundle

CHANNELS, DIM, TOKENS, FACTOR = 4, 8, 6, 4


class CaptionNet(nn.Module):
    """(x (B, 4, h, w), sigma (B,), txt (B, T, D)) -> (B, 4, h, w)."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.inp = nn.Conv2d(CHANNELS + 1, hidden, 1)
        self.txt = nn.Linear(DIM, hidden)
        self.out = nn.Conv2d(hidden, CHANNELS, 1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        h = self.inp(torch.cat([x, s], dim=1)) + self.txt(txt.mean(1).to(x.dtype))[:, :, None, None]
        return self.out(F.silu(h))


class PoolVAE(nn.Module):
    """Images (B, 3, H, W) -> (B, 4, H / 4, W / 4): 4x4 average pool and a fixed 1x1 projection."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, CHANNELS, 1)
        with torch.no_grad():
            g = torch.Generator().manual_seed(11)
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=g))
            self.proj.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(F.avg_pool2d(images, FACTOR))


class WordEncoder(nn.Module):
    """Captions -> (B, TOKENS, DIM): each word's row of a fixed table (by a CRC of the word), zero-padded."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(97, DIM)
        with torch.no_grad():
            self.table.weight.copy_(torch.randn(97, DIM, generator=torch.Generator().manual_seed(12)))

    def forward(self, captions: list[str]) -> torch.Tensor:
        out = torch.zeros(len(captions), TOKENS, DIM)
        for i, c in enumerate(captions):
            ids = [zlib.crc32(w.encode()) % 97 for w in c.replace(",", " ").split()][:TOKENS]
            if ids:
                out[i, :len(ids)] = self.table(torch.tensor(ids))
        return out


@attrs.define(eq=False)
class CaptionBundle(ModelBundle):
    _vae: PoolVAE | None = None
    _text: WordEncoder | None = None
    loaders: dict[str, Callable[[], nn.Module]] = attrs.Factory(dict)
    calls: Counter = attrs.Factory(Counter)      # encoder calls: "vae", "text"
    identity: dict[str, str] = attrs.Factory(lambda: {"vae": "pool-vae-1", "text": "word-encoder-1"})

    @property
    def vae(self) -> PoolVAE:
        return self._component("vae")

    @property
    def text(self) -> WordEncoder:
        return self._component("text")

    def _component(self, name: str) -> nn.Module:
        module = getattr(self, f"_{name}")
        if module is None:
            if name not in self.loaders:
                raise ConfigError(f"this stand-in bundle has no {name}")
            module = self.loaders.pop(name)()
            setattr(self, f"_{name}", module)
        return module

    def loaded(self, name: str) -> bool:
        return getattr(self, f"_{name}") is not None

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, txt: torch.Tensor | None = None) -> torch.Tensor:
        return self.network(x, sigma, txt)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.calls["vae"] += 1
        return self._component("vae")(images)

    def encode_captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.calls["text"] += 1
        return {"txt": self._component("text")(list(captions))}

    def encoder_identity(self) -> dict[str, str]:
        return dict(self.identity)

    def training_inputs(self, batch: dict[str, Any], *, dropout: float = 0.0,
                        generator: torch.Generator | None = None) -> dict[str, Any]:
        txt = batch["text"]["txt"] if "text" in batch else self.encode_captions(list(batch["caption"]))["txt"]
        if dropout > 0:
            drop = torch.rand(txt.shape[0], generator=generator) < dropout
            if drop.any():
                if self.empty_text is None:
                    self.empty_text = self.encode_captions([""])
                txt = torch.where(drop[:, None, None], self.empty_text["txt"].expand_as(txt), txt)
        return {"txt": txt}


def caption_bundle(seed: int = 0) -> CaptionBundle:
    """A fresh bundle whose autoencoder and text encoder load on first use."""
    torch.manual_seed(seed)
    return CaptionBundle(network=CaptionNet(), loaders={"vae": PoolVAE, "text": WordEncoder})
