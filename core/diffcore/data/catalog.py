"""The core's datasets, registered through ``register_datasets``. Imports no torch."""

from __future__ import annotations

from typing import Any

import attrs

from diffcore.errors import ConfigError


def _one_of(*choices: Any) -> Any:
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            raise ConfigError(f"must be one of {', '.join(map(str, choices))}, got {value!r}", path=attribute.name)
    return check


def _positive(instance: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"must be a positive integer, got {value}", path=attribute.name)


@attrs.frozen
class DigitsConfig:
    """scikit-learn's bundled 8x8 digits (1797 images); every 6th image is the held-out test split."""

    image_size: int = attrs.field(default=8, validator=_positive)
    split: str = attrs.field(default="train", validator=_one_of("train", "test", "all"))


@attrs.frozen
class ImageFolderConfig:
    """``path/<class>/<image>``: classes are the sorted subfolder names."""

    path: str
    image_size: int = attrs.field(default=64, validator=_positive)
    channels: int = attrs.field(default=3, validator=_one_of(1, 3))


@attrs.frozen
class Cifar10Config:
    """The extracted ``cifar-10-batches-py`` folder of the python CIFAR-10 release."""

    path: str
    split: str = attrs.field(default="train", validator=_one_of("train", "test"))


def build_digits(config: DigitsConfig) -> Any:
    from diffcore.data.datasets import DigitsDataset

    return DigitsDataset(image_size=config.image_size, split=config.split)


def build_image_folder(config: ImageFolderConfig) -> Any:
    from diffcore.data.datasets import ImageFolderDataset

    return ImageFolderDataset(config.path, image_size=config.image_size, channels=config.channels)


def build_cifar10(config: Cifar10Config) -> Any:
    from diffcore.data.datasets import Cifar10Dataset

    return Cifar10Dataset(config.path, split=config.split)


def register_datasets(register):
    register("digits", build_digits, config=DigitsConfig,
             description="scikit-learn's 8x8 handwritten digits (1797, 10 classes), no download")
    register("image-folder", build_image_folder, config=ImageFolderConfig,
             description="images in class subfolders, resized and center-cropped")
    register("cifar10", build_cifar10, config=Cifar10Config,
             description="CIFAR-10 from the extracted python release (cifar-10-batches-py)")
