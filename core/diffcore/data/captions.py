"""Captioned images: a folder of images with ``name.txt`` captions beside them, or a
``metadata.jsonl`` / ``metadata.json`` listing ``{"image" | "file_name", "caption" | "text",
"repeats"?}``. Each image goes to its aspect-ratio bucket (``buckets.py``), is resized to cover it
and cropped.

Items are ``{"image": (3, H, W) in [-1, 1], "caption", "original_size", "crop_top_left",
"target_size" (LongTensor[2], height then width, crop in resized pixels), "key" (the image's
path relative to the folder)}``.

Keys are ``(index, visit_seed)`` pairs from ``BucketBatches`` (a plain index is visit seed 0):
flip, random crop and tag order come from a generator seeded by the visit, so they follow the
sampler's position and an exact resume replays them. ``plan`` says everything about a visit
without decoding the image, which is what a latent cache keys its entries by.

Image headers are read at construction: a file PIL cannot open is skipped with one warning. A
file that opens but fails to decode later is swapped, with a warning, for the next image of its
bucket (in file order), so a batch keeps its size.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from diffcore.data.buckets import BucketBatches, cover_size, make_buckets, nearest_bucket
from diffcore.data.datasets import IMAGE_SUFFIXES
from diffcore.errors import ConfigError

METADATA = ("metadata.jsonl", "metadata.json")
_SWAPS_SIDES = {5, 6, 7, 8}   # EXIF orientations that rotate by 90 degrees


@attrs.frozen
class Entry:
    """One image file: ``size`` is (height, width) as it displays (EXIF orientation applied)."""

    file: Path
    key: str
    caption: str
    size: tuple[int, int]
    repeats: int = 1


@attrs.frozen
class Plan:
    """One visit of one sample, decided before any pixel is read."""

    entry: int                         # index into ``entries`` (a broken one already swapped out)
    bucket: tuple[int, int]            # (height, width) of the output
    resized: tuple[int, int]           # the size the image is resized to before the crop
    crop: tuple[int, int]              # (top, left) in the resized (and, if flipped, mirrored) image
    flip: bool
    caption: str


class CaptionedDataset(Dataset):
    """See the module docstring; the options are ``CaptionedConfig``'s (``data/catalog.py``)."""

    def __init__(self, path: str | Path, *, resolution: int = 1024, repeats: int = 1, caption_extension: str = ".txt",
                 shuffle_tags: bool = False, keep_tokens: int = 0, flip: bool = False, center_crop: bool = True,
                 bucketing: bool = True, bucket_resolution_steps: int = 64, min_bucket_resolution: int = 256,
                 max_bucket_resolution: int = 2048, conditioning_data: str | None = None):
        path = Path(path).expanduser()
        self.root = path.parent if path.is_file() else path
        if not self.root.is_dir():
            raise ConfigError(f"captioned dataset folder {path} does not exist; expected a folder of images with "
                              f"{caption_extension} captions beside them, or a metadata.jsonl", path="dataset.path")
        self.caption_extension, self.shuffle_tags, self.keep_tokens = caption_extension, shuffle_tags, keep_tokens
        self.flip, self.center_crop = flip, center_crop
        listed = _read_metadata(path if path.is_file() else self._metadata_file())
        candidates = listed if listed is not None else self._paired_files()
        self.entries = [e for e in (_scan(*c) for c in candidates) if e is not None]
        if not self.entries:
            where = "listed in its metadata file" if listed is not None else f"({', '.join(sorted(IMAGE_SUFFIXES))})"
            raise ConfigError(f"captioned dataset {path} has no readable images {where}", path="dataset.path")
        if bucketing:
            self.buckets = make_buckets(resolution, bucket_resolution_steps, min_bucket_resolution,
                                        max_bucket_resolution)
        else:
            self.buckets = [(resolution, resolution)]
        self.bucket_of = [nearest_bucket(*e.size, self.buckets) for e in self.entries]
        #: sample index -> entry index: every image ``repeats * entry.repeats`` times, in file order
        self.samples = [i for i, e in enumerate(self.entries) for _ in range(repeats * e.repeats)]
        if not self.samples:
            raise ConfigError(f"captioned dataset {path}: every image has repeats = 0", path="dataset.repeats")
        self.broken: set[int] = set()   # entries that failed to decode (found in this process)
        self.conditioning = self._conditioning_files(conditioning_data) if conditioning_data else None

    def _conditioning_files(self, folder: str) -> list[Path]:
        """Per entry, its conditioning image in ``folder``: the same relative name, any image suffix
        (ControlNet training's ``precomputed`` maps). One missing is an error naming it."""
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise ConfigError(f"conditioning_data folder {root} does not exist", path="dataset.conditioning_data")
        found = []
        for e in self.entries:
            stem = root / Path(e.key).with_suffix("")
            match = next((stem.with_suffix(s) for s in sorted(IMAGE_SUFFIXES) if stem.with_suffix(s).is_file()), None)
            if match is None:
                raise ConfigError(f"no conditioning image for {e.file} in {root}: expected {stem}.png (or another "
                                  f"image suffix)", path="dataset.conditioning_data")
            found.append(match)
        return found

    def _metadata_file(self) -> Path | None:
        return next((self.root / m for m in METADATA if (self.root / m).is_file()), None)

    def _paired_files(self) -> list[tuple[Path, str, str | None, int, str]]:
        files = sorted(f for f in self.root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                       and not any(p.startswith(".") for p in f.relative_to(self.root).parts))
        out, uncaptioned = [], []
        for f in files:
            text = f.with_suffix(self.caption_extension)
            caption = text.read_text(encoding="utf-8", errors="replace").strip() if text.is_file() else None
            if caption is None:
                uncaptioned.append(f.name)
            out.append((f, f.relative_to(self.root).as_posix(), caption or "", 1, ""))
        if uncaptioned:
            warnings.warn(f"{len(uncaptioned)} images in {self.root} have no {self.caption_extension} caption and "
                          f"train with the empty one: {', '.join(uncaptioned[:5])}"
                          f"{', ...' if len(uncaptioned) > 5 else ''}", stacklevel=3)
        return out

    def __len__(self) -> int:
        return len(self.samples)

    def batch_sampler(self, seed: int, rank: int = 0, world_size: int = 1, batch_size: int | None = None
                      ) -> BucketBatches:
        """What the training loop draws batches from: one bucket per batch."""
        return BucketBatches([self.bucket_of[e] for e in self.samples], seed, rank=rank, world_size=world_size,
                             batch_size=batch_size)

    def plan(self, index: int, seed: int = 0, *, flip: bool | None = None, center_crop: bool | None = None) -> Plan:
        """Visit ``seed`` of sample ``index``; ``flip`` / ``center_crop`` override the draw (a cache's variants)."""
        entry = self._usable(self.samples[index])
        bucket = self.buckets[self.bucket_of[entry]]
        resized = cover_size(*self.entries[entry].size, bucket)
        g = torch.Generator().manual_seed(seed)
        flipped = bool(torch.rand((), generator=g) < 0.5) if self.flip else False
        flipped = flipped if flip is None else flip
        if self.center_crop if center_crop is None else center_crop:
            top, left = (resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2
        else:
            top = int(torch.randint(resized[0] - bucket[0] + 1, (), generator=g))
            left = int(torch.randint(resized[1] - bucket[1] + 1, (), generator=g))
        if flipped:   # the same pixels, seen in the mirrored image
            left = resized[1] - bucket[1] - left
        return Plan(entry=entry, bucket=bucket, resized=resized, crop=(top, left), flip=flipped,
                    caption=self._caption(self.entries[entry].caption, g))

    def _caption(self, caption: str, g: torch.Generator) -> str:
        if not self.shuffle_tags:
            return caption
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        fixed, rest = tags[:self.keep_tokens], tags[self.keep_tokens:]
        return ", ".join(fixed + [rest[i] for i in torch.randperm(len(rest), generator=g).tolist()])

    def _usable(self, entry: int) -> int:
        """``entry``, or the next one of its bucket (cyclic, file order) when it failed to decode."""
        if entry not in self.broken:
            return entry
        bucket = self.bucket_of[entry]
        n = len(self.entries)
        for step in range(1, n):
            other = (entry + step) % n
            if self.bucket_of[other] == bucket and other not in self.broken:
                return other
        h, w = self.buckets[bucket]
        raise ConfigError(f"every image of bucket {h}x{w} in {self.root} failed to decode "
                          f"(the first: {self.entries[entry].file})", path="dataset.path")

    def render(self, plan: Plan) -> dict[str, Any]:
        """The item ``plan`` describes (decodes the image; PIL's errors pass through)."""
        e = self.entries[plan.entry]
        item = {"image": _fitted(e.file, plan), **self.metadata(plan)}
        if self.conditioning is not None:
            item["conditioning_image"] = self.conditioning_image(plan)
        return item

    def conditioning_image(self, plan: Plan) -> torch.Tensor:
        """The entry's conditioning image, resized, flipped and cropped as the image is."""
        return _fitted(self.conditioning[plan.entry], plan)

    def metadata(self, plan: Plan) -> dict[str, Any]:
        """Everything of an item but its pixels (what a latent cache serves beside the latents)."""
        e = self.entries[plan.entry]
        return {"caption": plan.caption, "original_size": torch.tensor(e.size),
                "crop_top_left": torch.tensor(plan.crop), "target_size": torch.tensor(plan.bucket), "key": e.key}

    def load(self, index: int, seed: int = 0, **overrides: bool) -> tuple[Plan, dict[str, Any]]:
        """(plan, item) of a visit; an image that fails to decode is marked broken (one warning)
        and the visit re-planned onto the next image of its bucket."""
        while True:
            plan = self.plan(index, seed, **overrides)
            try:
                return plan, self.render(plan)
            except Exception as exc:   # PIL raises OSError, ValueError, SyntaxError, ... for broken files
                self.broken.add(plan.entry)
                warnings.warn(f"cannot decode {self.entries[plan.entry].file} ({exc}); using the next image of "
                              f"its {plan.bucket[0]}x{plan.bucket[1]} bucket instead", stacklevel=2)

    def __getitem__(self, key: int | Sequence[int]) -> dict[str, Any]:
        index, seed = (int(key[0]), int(key[1])) if isinstance(key, tuple | list) else (int(key), 0)
        return self.load(index, seed)[1]


def _fitted(file: Path, plan: Plan) -> torch.Tensor:
    """``file`` resized, flipped and cropped as ``plan`` says, (3, H, W) in [-1, 1]."""
    with Image.open(file) as img:
        img = _rgb(ImageOps.exif_transpose(img))
        (rh, rw), (bh, bw), (top, left) = plan.resized, plan.bucket, plan.crop
        if (rh, rw) != (img.height, img.width):
            down = rh < img.height
            img = img.resize((rw, rh), Image.Resampling.LANCZOS if down else Image.Resampling.BICUBIC)
        if plan.flip:
            img = ImageOps.mirror(img)
        pixels = np.asarray(img.crop((left, top, left + bw, top + bh)), dtype=np.uint8)
    return (torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1.0).contiguous()


def _rgb(img: Image.Image) -> Image.Image:
    """RGB, transparent pixels on white (what a transparent PNG looks like in a viewer)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _scan(file: Path, key: str, caption: str, repeats: int, source: str) -> Entry | None:
    """The entry of ``file`` from its header alone; None (with a warning naming it, and ``source``,
    the metadata line listing it) when PIL cannot read it."""
    try:
        with Image.open(file) as img:
            width, height = img.size
            if _orientation(img) in _SWAPS_SIDES:
                width, height = height, width
    except Exception as exc:   # missing, truncated header, not an image, decompression bomb ...
        listed = f" (listed at {source})" if source else ""
        warnings.warn(f"skipping {file}{listed}: cannot read it as an image ({type(exc).__name__}: {exc})",
                      stacklevel=3)
        return None
    return Entry(file=file, key=key, caption=caption, size=(height, width), repeats=repeats)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation from the header; a PNG's ``getexif()`` would decode the whole image to
    look for a late eXIf chunk (``render`` resizes to the planned size whatever it finds)."""
    if img.format == "PNG":
        if not img.info.get("exif"):
            return 1
        exif = Image.Exif()
        exif.load(img.info["exif"])
        return exif.get(0x0112, 1)
    return img.getexif().get(0x0112, 1)


def _read_metadata(file: Path | None) -> list[tuple[Path, str, str, int, str]] | None:
    """(image file, key, caption, repeats, where) per record of a metadata file; None without one."""
    if file is None:
        return None
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((json.loads(line), f"{file} line {n}"))
                except ValueError as exc:
                    raise ConfigError(f"{file} line {n} is not JSON ({exc}); expected one object per line like "
                                      '{"file_name": "a.png", "text": "a caption"}', path="dataset.path") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{file} is not JSON ({exc})", path="dataset.path") from None
        if not isinstance(data, list):
            raise ConfigError(f"{file} holds a {type(data).__name__}; expected a list of objects like "
                              '{"image": "a.png", "caption": "a caption"}', path="dataset.path")
        records = [(r, f"{file} entry {i}") for i, r in enumerate(data)]
    root, out = file.parent, []
    for record, where in records:
        name = record.get("image", record.get("file_name")) if isinstance(record, dict) else None
        if not isinstance(name, str):
            raise ConfigError(f"{where} has no image file name; expected an object with \"image\" or \"file_name\" "
                              f"(and \"caption\" or \"text\"), got {record!r}"[:400], path="dataset.path")
        caption = record.get("caption", record.get("text", ""))
        repeats = record.get("repeats", 1)
        if not isinstance(caption, str):
            raise ConfigError(f"{where}: the caption must be a string, got {caption!r}", path="dataset.path")
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 0:
            raise ConfigError(f"{where}: repeats must be a whole number >= 0, got {repeats!r}", path="dataset.path")
        image = root / name
        key = image.relative_to(root).as_posix() if image.is_relative_to(root) else image.as_posix()
        out.append((image, key, caption.strip(), repeats, where))
    return out
