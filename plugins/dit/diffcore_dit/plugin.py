"""diffcore plugin: the ``dit`` model family. Imports no torch; ``build_dit`` does, when called."""

from __future__ import annotations

from typing import Any

import attrs

from diffcore.api import ConfigError, hookimpl, one_of, variant_of
from diffcore_dit.params import VARIANTS, DiTParams

DTYPES = ("float32", "bfloat16")
OVERRIDES = ("hidden", "depth", "heads", "image_size", "in_channels", "num_classes")


def _positive(instance: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and value < (0 if attribute.name == "num_classes" else 1):
        raise ConfigError(f"must be a positive integer, got {value}", path=attribute.name)


def _override() -> Any:
    return attrs.field(default=None, validator=_positive)


@attrs.frozen
class DiTConfig:
    """``variant`` picks a row of the variant table; set fields override it; ``checkpoint`` loads weights."""

    variant: str = attrs.field(default="digits", validator=variant_of("DiT", VARIANTS, auto=False))
    hidden: int | None = _override()
    depth: int | None = _override()
    heads: int | None = _override()
    image_size: int | None = _override()
    in_channels: int | None = _override()
    num_classes: int | None = _override()
    checkpoint: str | None = None   # .safetensors file, or a training checkpoint folder
    dtype: str = attrs.field(default="float32", validator=one_of(DTYPES))

    def params(self) -> DiTParams:
        changes = {k: getattr(self, k) for k in OVERRIDES if getattr(self, k) is not None}
        return attrs.evolve(VARIANTS[self.variant], **changes)

    def check_image_side(self, side: str, pixels: int) -> None:
        """A DiT makes images of its own size only (pixel space, a fixed grid of positions):
        the generate job asks before any weights load."""
        size = self.params().image_size
        if pixels != size:
            raise ValueError(f"this DiT ({self.variant}) makes {size}x{size} images, so {side} must be {size} "
                             f"(or left unset), not {pixels}")


def build_dit(config: DiTConfig, device: Any = "cpu") -> Any:
    """A ``DiTBundle`` on ``device``; weights from ``config.checkpoint`` or DiT's fresh init."""
    import torch

    from diffcore_dit.bundle import DiTBundle
    from diffcore_dit.convert import load_weights
    from diffcore_dit.model import DiT2D

    network = DiT2D(config.params())
    if config.checkpoint:
        load_weights(network, config.checkpoint)
    network.to(device=device, dtype=getattr(torch, config.dtype))
    return DiTBundle(network=network)


@hookimpl
def register_models(register):
    register("dit", build_dit, config=DiTConfig,
             description="DiT (Peebles & Xie 2023): class-conditional pixel-space flow transformer")
