"""Latent and text-embedding caches: encode a captioned dataset once, train from disk after.

Before training, every image (in its bucket, center crop; both orientations when ``flip`` is on,
since a flipped image's latents are not the flipped latents) goes through ``bundle.encode`` and
every caption, and "", through ``bundle.encode_captions``, each into its own safetensors file
under ``cache_dir/latents`` / ``cache_dir/text``. A file is named by a hash of everything its
content depends on:

- latents: the image's key (path in the dataset), its size and modification time (hashing every
  image's bytes on every start would read the whole dataset), the bucket, resize and crop,
  the flip, ``encoder_identity()["vae"]`` and ``FORMAT``;
- text: the caption and ``encoder_identity()["text"]``.

So a changed image, caption, bucket or encoder makes exactly the entries it touches missing,
and only those are encoded again; old entries stay on disk until the folder is deleted. Writes
are atomic (a ``.NAME.tmp`` file, then ``os.replace``). With everything cached, nothing calls
the bundle's encoders, so the families' lazily loaded autoencoder and text encoders never load.

Refused: ``cache_latents`` with random crops (``center_crop = false``: one crop per image is what
is cached) and ``cache_text_embeddings`` with ``shuffle_tags`` (a new caption every visit).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from diffcore.data.catalog import cache_refusal
from diffcore.errors import ConfigError

#: Bump when the pixels an entry is made from change for the same key (resize filter, crop rule).
FORMAT = 1
STATS = "encoders.json"   # what encoding cost when the entries were written: reported when it is saved


class CachedDataset(Dataset):
    """``dataset``'s items with ``latents`` in place of ``image`` and/or ``text`` (the dict
    ``encode_captions`` returned, per sample) beside ``caption``; same keys, same batch sampler."""

    def __init__(self, dataset: Any, latents: dict[tuple[int, bool], Path] | None, text: dict[str, Path] | None):
        self.dataset, self.latents, self.text = dataset, latents, text

    def __len__(self) -> int:
        return len(self.dataset)

    def batch_sampler(self, *args: Any, **kwargs: Any) -> Any:
        return self.dataset.batch_sampler(*args, **kwargs)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        index, seed = (int(key[0]), int(key[1])) if isinstance(key, tuple | list) else (int(key), 0)
        if self.latents is not None:
            plan = self.dataset.plan(index, seed)
            item = self.dataset.metadata(plan)
            item["latents"] = load_file(self.latents[plan.entry, plan.flip])["latents"]
            if getattr(self.dataset, "conditioning", None) is not None:
                item["conditioning_image"] = self.dataset.conditioning_image(plan)
        else:
            item = self.dataset.load(index, seed)[1]
        if self.text is not None:
            item["text"] = load_file(self.text[item["caption"]])
        return item


def cache_for_job(dataset: Any, bundle: Any, s: Any, *, output_dir: str | Path, state: Any) -> CachedDataset:
    """The train job's caches (``[job] cache_latents``, ``cache_text_embeddings``, ``cache_dir``):
    the main process encodes what is missing, then the others read what it wrote."""
    cache_dir = Path(s.cache_dir).expanduser() if s.cache_dir else Path(output_dir) / "cache"
    say = (lambda text: print(text, file=sys.stderr)) if state.is_main_process else (lambda text: None)
    with state.main_process_first():
        return cache_dataset(dataset, bundle, cache_dir, latents=s.cache_latents, text=s.cache_text_embeddings,
                             say=say, main=state.is_main_process)


def cache_dataset(dataset: Any, bundle: Any, cache_dir: str | Path, *, latents: bool = True, text: bool = True,
                  say: Callable[[str], None] = lambda text: print(text, file=sys.stderr),
                  main: bool = True) -> CachedDataset:
    """Encode what ``cache_dir`` lacks, set ``bundle.empty_text`` from the cache, and return the
    dataset reading from it. ``main``: the process that shows progress and keeps ``encoders.json``
    (the others run after it, finding everything cached)."""
    _check(dataset, bundle, latents, text)
    cache_dir = Path(cache_dir)
    identity = bundle.encoder_identity()
    for sub in ("latents", "text"):
        for stale in (cache_dir / sub).glob(".*.tmp") if main else ():   # a killed run's half-written entry
            stale.unlink()
    t0 = time.perf_counter()
    spent: dict[str, list[float]] = {"vae": [0, 0.0], "text": [0, 0.0]}   # entries encoded, seconds
    latent_files = _cache_latents(dataset, bundle, cache_dir / "latents", identity["vae"], spent, main) \
        if latents else None
    text_files = None
    if text:
        captions = sorted({e.caption for e in dataset.entries} | {""})
        text_files = _cache_text(captions, bundle, cache_dir / "text", identity["text"], spent, main)
        bundle.empty_text = {k: v[None] for k, v in load_file(text_files[""]).items()}
    if main:
        _report(bundle, cache_dir, identity, spent, latent_files, text_files, time.perf_counter() - t0, say)
    return CachedDataset(dataset, latent_files, text_files)


def _check(dataset: Any, bundle: Any, latents: bool, text: bool) -> None:
    what = "cache_latents" if latents else "cache_text_embeddings"
    if not all(hasattr(dataset, a) for a in ("plan", "metadata", "entries")):
        raise ConfigError(f"{what} needs a dataset that can plan its items without decoding them "
                          f"([dataset] name = \"captioned\"), not {type(dataset).__name__}", path=f"job.{what}")
    refusal = cache_refusal(dataset, latents=latents, text=text)
    if refusal is not None:
        raise refusal
    identity = bundle.encoder_identity()
    for key, wanted in (("vae", latents), ("text", text)):
        if wanted and not identity.get(key):
            raise ConfigError(f"{type(bundle).__name__}.encoder_identity() has no {key!r} entry, so a cache could not "
                              f"tell when its encoder changed; this family cannot cache {key} outputs",
                              path=f"job.{what}")


def _cache_latents(dataset: Any, bundle: Any, folder: Path, vae: str, spent: dict[str, list[float]],
                   progress: bool) -> dict[tuple[int, bool], Path]:
    """(entry, flip) -> latents file, for every entry a sample can resolve to."""
    flips = (False, True) if dataset.flip else (False,)
    first_sample: dict[int, int] = {}
    for i, e in enumerate(dataset.samples):
        first_sample.setdefault(e, i)
    files: dict[tuple[int, bool], Path] = {}
    todo = []
    for i in first_sample.values():
        for flip in flips:
            plan = dataset.plan(i, 0, flip=flip)
            path = folder / f"{_latent_key(dataset, plan, vae)}.safetensors"
            if path.is_file():
                files[plan.entry, flip] = path
            else:
                todo.append((i, flip))
    device = next(bundle.network.parameters()).device
    for i, flip in tqdm(todo, desc="cache latents", disable=not progress or not sys.stderr.isatty()):
        plan = dataset.plan(i, 0, flip=flip)
        path = folder / f"{_latent_key(dataset, plan, vae)}.safetensors"
        if not path.is_file():
            plan, item = dataset.load(i, 0, flip=flip)       # a broken image: the next one of its bucket
            path = folder / f"{_latent_key(dataset, plan, vae)}.safetensors"
        if not path.is_file():
            t = time.perf_counter()
            with torch.no_grad():
                z = bundle.encode(item["image"][None].to(device))[0]
            spent["vae"][0] += 1
            spent["vae"][1] += time.perf_counter() - t
            e = dataset.entries[plan.entry]
            _write(path, {"latents": z}, {"key": e.key, "bucket": "x".join(map(str, plan.bucket)),
                                          "flip": str(plan.flip), "vae": vae})
        files[plan.entry, flip] = path
    return files


def _cache_text(captions: list[str], bundle: Any, folder: Path, encoder: str, spent: dict[str, list[float]],
                progress: bool) -> dict[str, Path]:
    files = {c: folder / f"{_hash(['text', FORMAT, c, encoder])}.safetensors" for c in captions}
    todo = [c for c in captions if not files[c].is_file()]
    for caption in tqdm(todo, desc="cache text", disable=not progress or not sys.stderr.isatty()):
        t = time.perf_counter()
        with torch.no_grad():
            encoded = bundle.encode_captions([caption])
        spent["text"][0] += 1
        spent["text"][1] += time.perf_counter() - t
        _write(files[caption], {k: v[0] for k, v in encoded.items()}, {"caption": caption, "text": encoder})
    return files


def _latent_key(dataset: Any, plan: Any, vae: str) -> str:
    e = dataset.entries[plan.entry]
    st = e.file.stat()
    return _hash(["latents", FORMAT, e.key, st.st_size, st.st_mtime_ns, plan.bucket, plan.resized, plan.crop,
                  plan.flip, vae])


def _hash(parts: list[Any]) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:32]


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _module_bytes(bundle: Any, name: str) -> int | None:
    """Bytes of the bundle's component ``name`` if it is in memory (never loading it to find out)."""
    loaded = getattr(bundle, "loaded", None)
    if not callable(loaded) or not loaded(name):
        return None
    module = getattr(bundle, name, None)
    if not isinstance(module, torch.nn.Module):
        return None
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _report(bundle: Any, cache_dir: Path, identity: dict[str, str], spent: dict[str, list[float]],
            latent_files: dict | None, text_files: dict | None, seconds: float, say: Callable[[str], None]) -> None:
    """Say what was encoded now, and what a cached run did not spend: the encoders' memory and
    the encoding time, as measured when the entries were written (``encoders.json``)."""
    stats_file = cache_dir / STATS
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    parts = []
    for name, files, label in (("vae", latent_files, "latents"), ("text", text_files, "text embeddings")):
        if files is None:
            continue
        count, secs = spent[name]
        parts.append(f"{len(set(files.values()))} {label} ({int(count)} encoded now)")
        record = stats.get(name, {})
        if record.get("identity") != identity[name]:
            record = {"identity": identity[name]}
        if count:
            total = record.get("entries", 0) + count
            record.update(entries=total, seconds=record.get("seconds", 0.0) + secs)
        size = _module_bytes(bundle, name)
        if size is not None:
            record["bytes"] = size
        stats[name] = record
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = stats_file.with_name(f".{STATS}.tmp")
    tmp.write_text(json.dumps(stats, indent=1))
    os.replace(tmp, stats_file)
    say(f"cache {cache_dir}: {', '.join(parts)} in {seconds:.1f} s")
    loaded = getattr(bundle, "loaded", None)
    for name, files, label in (("vae", latent_files, "autoencoder"), ("text", text_files, "text encoders")):
        if files is None or not callable(loaded) or loaded(name):
            continue
        record = stats.get(name, {})
        saved = [f"{_size(record['bytes'])} of weights"] if "bytes" in record else []
        if record.get("entries"):
            rate = record["seconds"] / record["entries"]
            saved.append(f"about {rate * len(set(files.values())):.2g} s of encoding")
        say(f"cache: the {label} stayed unloaded" + (f" ({' and '.join(saved)} not spent)" if saved else ""))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
