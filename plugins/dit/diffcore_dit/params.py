"""DiT variants as data (torch-free, so the plugin module can validate configs without torch)."""

from __future__ import annotations

import attrs


@attrs.frozen
class DiTParams:
    """Everything that fixes a DiT's shape. ``num_classes`` excludes the null (CFG) class."""

    hidden: int
    depth: int
    heads: int
    patch: int = 2
    in_channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    mlp_ratio: float = 4.0
    # Sinusoid frequencies exp(-ln(1e4) i / (half - shift)): diffusers' DiT uses shift 1, the
    # original DiT and FLUX use 0. Kept at 1 so diffusers checkpoints convert exactly.
    freq_shift: float = 1.0

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


VARIANTS: dict[str, DiTParams] = {
    # sklearn's 8x8 digits (or 16x16): 0.33M parameters; 500 steps of batch 128 (about two minutes
    # on two CPU cores) give samples a logistic-regression digit classifier labels 93% correctly
    "digits": DiTParams(hidden=64, depth=4, heads=4, patch=2, in_channels=1, image_size=8, num_classes=10),
    "cifar": DiTParams(hidden=384, depth=12, heads=6, patch=2, in_channels=3, image_size=32, num_classes=10),
    # DiT paper sizes (Peebles & Xie 2023, table 1), here on 64x64 pixels with ImageNet's 1000 classes
    "S-2": DiTParams(hidden=384, depth=12, heads=6, patch=2, in_channels=3, image_size=64, num_classes=1000),
    "B-2": DiTParams(hidden=768, depth=12, heads=12, patch=2, in_channels=3, image_size=64, num_classes=1000),
}
