"""Map-style datasets yielding ``{"image": (C, H, W) float in [-1, 1], "label": int64 scalar}``."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch.utils.data import Dataset

from diffcore.errors import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _item(image: torch.Tensor, label: int) -> dict[str, torch.Tensor]:
    return {"image": image, "label": torch.tensor(label, dtype=torch.long)}


def _from_uint8(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(pixels).float() / 127.5 - 1.0


class DigitsDataset(Dataset):
    """scikit-learn's 1797 8x8 digits (values 0..16), optionally resized (bilinear) to ``image_size``.

    The held-out ``test`` split is every 6th image (index % 6 == 5, 299 images); the file cycles
    through the classes, so both splits stay balanced.
    """

    def __init__(self, image_size: int = 8, split: str = "train"):
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ConfigError("the digits dataset is scikit-learn's bundled copy: pip install scikit-learn "
                              "(or pip install 'diffcore[digits]')") from None

        digits = load_digits()
        images = rearrange(torch.from_numpy(digits.images).float() / 8.0 - 1.0, "n h w -> n 1 h w")
        if image_size != images.shape[-1]:
            images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False,
                                   antialias=image_size < images.shape[-1]).clamp(-1.0, 1.0)
        labels = torch.from_numpy(digits.target).long()
        held_out = torch.arange(len(labels)) % 6 == 5
        keep = {"train": ~held_out, "test": held_out, "all": torch.ones_like(held_out)}[split]
        self.images, self.labels = images[keep].contiguous(), labels[keep]
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i]}


class ImageFolderDataset(Dataset):
    """``root/<class>/**/<image>``; labels follow the sorted class folder names.

    Each image is resized so its shorter side is ``image_size`` (bicubic), then center-cropped.
    """

    def __init__(self, root: str | Path, image_size: int = 64, channels: int = 3):
        self.root, self.image_size = Path(root), image_size
        self.mode = {1: "L", 3: "RGB"}[channels]
        if not self.root.is_dir():
            raise ConfigError(f"image folder {self.root} does not exist", path="path")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise ConfigError(f"image folder {self.root} has no class subfolders; expected "
                              f"{self.root}/<class name>/<image files>", path="path")
        self.samples = [(f, label) for label, name in enumerate(self.classes)
                        for f in sorted((self.root / name).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not self.samples:
            raise ConfigError(f"image folder {self.root} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                              f"in its class subfolders {', '.join(self.classes[:5])}", path="path")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        file, label = self.samples[i]
        with Image.open(file) as img:
            img = img.convert(self.mode)
            s = self.image_size
            scale = s / min(img.size)
            w, h = max(s, round(img.width * scale)), max(s, round(img.height * scale))
            img = img.resize((w, h), Image.BICUBIC)
            left, top = (w - s) // 2, (h - s) // 2
            pixels = np.array(img.crop((left, top, left + s, top + s)))
        image = _from_uint8(pixels)
        image = rearrange(image, "h w -> 1 h w") if image.ndim == 2 else rearrange(image, "h w c -> c h w")
        return _item(image.contiguous(), label)


class Cifar10Dataset(Dataset):
    """CIFAR-10 (Krizhevsky 2009) from the python release: pickled ``data_batch_1..5`` / ``test_batch``."""

    FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}

    def __init__(self, root: str | Path, split: str = "train"):
        self.root = Path(root)
        files = self.FILES[split]
        missing = [f for f in files if not (self.root / f).is_file()]
        if missing:
            expected = ", ".join(self.FILES["train"] + self.FILES["test"])
            raise ConfigError(f"CIFAR-10 folder {self.root} is missing {', '.join(missing)}; expected the "
                              f"extracted python release (cifar-10-batches-py) holding {expected}", path="path")
        data, labels = [], []
        for name in files:
            with open(self.root / name, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            data.append(np.asarray(batch[b"data"], dtype=np.uint8))
            labels.extend(batch[b"labels"])
        self.pixels = torch.from_numpy(rearrange(np.concatenate(data), "n (c h w) -> n c h w", c=3, h=32, w=32))
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.classes = list(CIFAR10_CLASSES)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": _from_uint8(self.pixels[i]), "label": self.labels[i]}
