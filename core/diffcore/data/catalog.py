"""The core's datasets, registered through ``register_datasets``. Imports no torch."""

from __future__ import annotations

from typing import Any

import attrs

from diffcore.config.validators import local_path
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


def _nonnegative(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if value < 0:
        raise ConfigError(f"must be a whole number >= 0, got {value}", path=attribute.name)


@attrs.frozen
class CaptionedConfig:
    """Images with captions: ``name.txt`` beside ``name.png``, or ``metadata.jsonl`` / ``metadata.json``
    records ``{"image" | "file_name", "caption" | "text", "repeats"?}``. Bucketed by aspect ratio:
    buckets of about ``resolution^2`` pixels, sides multiples of ``bucket_resolution_steps`` within
    [``min_bucket_resolution``, ``max_bucket_resolution``]; ``bucketing = false``: squares of
    ``resolution``. Caption dropout is the trainer's ``cond_dropout``."""

    path: str = attrs.field(validator=local_path)
    resolution: int = attrs.field(default=1024, validator=_positive)
    repeats: int = attrs.field(default=1, validator=_positive)
    caption_extension: str = ".txt"
    shuffle_tags: bool = False                # shuffle the comma-separated tags each visit ...
    keep_tokens: int = attrs.field(default=0, validator=_nonnegative)   # ... but these first ones
    flip: bool = False                        # random horizontal flip, p = 0.5
    center_crop: bool = True                  # false: a random crop each visit
    bucketing: bool = True
    bucket_resolution_steps: int = attrs.field(default=64, validator=_positive)
    min_bucket_resolution: int = attrs.field(default=256, validator=_positive)
    max_bucket_resolution: int = attrs.field(default=2048, validator=_positive)
    conditioning_data: str | None = attrs.field(default=None, validator=local_path)   # ControlNet maps, same names

    def __attrs_post_init__(self) -> None:
        if not self.caption_extension.startswith("."):
            raise ConfigError(f"must start with a dot, like \".txt\", got {self.caption_extension!r}",
                              path="caption_extension")
        if not self.bucketing:
            return
        step, lo, hi = self.bucket_resolution_steps, self.min_bucket_resolution, self.max_bucket_resolution
        if lo % step or hi % step:
            raise ConfigError(f"min_bucket_resolution ({lo}) and max_bucket_resolution ({hi}) must be multiples of "
                              f"bucket_resolution_steps ({step})", path="bucket_resolution_steps")
        if not lo <= self.resolution <= hi:
            raise ConfigError(f"must lie within [min_bucket_resolution, max_bucket_resolution] = [{lo}, {hi}], "
                              f"got {self.resolution}", path="resolution")


def cache_refusal(options: Any, *, latents: bool, text: bool) -> ConfigError | None:
    """Why the train job's caches cannot hold this dataset's items (``options``: its config or the
    dataset itself), or None; the job checks it before any model loads, ``data/cache.py`` again."""
    if latents and getattr(options, "center_crop", True) is False:
        return ConfigError("cache_latents caches one crop per image, but the dataset crops at random on every visit "
                           "(center_crop = false): set center_crop = true or cache_latents = false",
                           path="job.cache_latents")
    if text and getattr(options, "shuffle_tags", False):
        return ConfigError("cache_text_embeddings caches one embedding per caption, but shuffle_tags makes a new "
                           "caption on every visit: set shuffle_tags = false or cache_text_embeddings = false",
                           path="job.cache_text_embeddings")
    return None


def build_digits(config: DigitsConfig) -> Any:
    from diffcore.data.datasets import DigitsDataset

    return DigitsDataset(image_size=config.image_size, split=config.split)


def build_image_folder(config: ImageFolderConfig) -> Any:
    from diffcore.data.datasets import ImageFolderDataset

    return ImageFolderDataset(config.path, image_size=config.image_size, channels=config.channels)


def build_cifar10(config: Cifar10Config) -> Any:
    from diffcore.data.datasets import Cifar10Dataset

    return Cifar10Dataset(config.path, split=config.split)


def build_captioned(config: CaptionedConfig) -> Any:
    from diffcore.data.captions import CaptionedDataset

    return CaptionedDataset(**attrs.asdict(config))


def register_datasets(register):
    register("digits", build_digits, config=DigitsConfig,
             description="scikit-learn's 8x8 handwritten digits (1797, 10 classes), no download")
    register("image-folder", build_image_folder, config=ImageFolderConfig,
             description="images in class subfolders, resized and center-cropped")
    register("cifar10", build_cifar10, config=Cifar10Config,
             description="CIFAR-10 from the extracted python release (cifar-10-batches-py)")
    register("captioned", build_captioned, config=CaptionedConfig,
             description="images with .txt captions or metadata.jsonl, in aspect-ratio buckets")
