"""Loading a full-size FLUX.2 klein-4b transformer on CPU: diffcore's loader against diffusers'
``Flux2Transformer2DModel.from_pretrained``, on the same random bf16 weights (about 7.8 GB).

The first run writes the checkpoint under DIR (default /tmp), once, streaming one tensor at a time:
the same weights in diffusers' layout (``flux2-klein-4b-random/transformer/``, config and one
safetensors file) and in BFL's (``flux2-klein-4b-random/flux-2-klein-4b.safetensors``). Each
measurement then runs in a fresh process and reports

- load: seconds from the loader's call until it returns a module on the CPU in bf16;
- ready: load plus touching one value in every 4 KiB page of every weight, since safetensors
  maps files lazily: what a first forward would otherwise pay;
- process: the whole child's wall time, interpreter start and imports included;
- peak RSS (``ru_maxrss``, pages of the mapped file counted) and its ratio to the checkpoint size.

Each loader runs once with its file dropped from the page cache (cold, ``posix_fadvise``), then
``--warm`` times with the file read into the cache just before (warm; the fastest run counts).
Targets (issue 5): diffcore faster, its peak RSS at most 1.1x the checkpoint.

    python benchmarks/load.py [DIR] [--warm 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

NAME = "flux2-klein-4b-random"
BFL_FILE = "flux-2-klein-4b.safetensors"
DIFFUSERS_FILE = "transformer/diffusion_pytorch_model.safetensors"
LOADERS = {  # name -> the file it reads
    "diffcore (diffusers layout)": DIFFUSERS_FILE,
    "diffcore (BFL file)": BFL_FILE,
    "diffusers from_pretrained": DIFFUSERS_FILE,
}
PAGE = 4096


# -- writing the checkpoint once ----------------------------------------------------------------
def write_checkpoint(root: Path) -> None:
    """Random bf16 weights with klein-4b's shapes, in both layouts, streamed tensor by tensor."""
    import torch

    from diffcore_flux2.convert import bfl_to_diffusers
    from diffcore_flux2.model import VARIANTS, Flux2

    with torch.device("meta"):
        bfl_shapes = {k: tuple(v.shape) for k, v in Flux2(VARIANTS["klein-4b"]).state_dict().items()}
    # per BFL key, the diffusers tensors it becomes (qkv split, final adaLN halves swapped)
    parts = {k: {n: tuple(t.shape) for n, t in bfl_to_diffusers({k: torch.empty(s, device="meta")}).items()}
             for k, s in bfl_shapes.items()}
    (root / "transformer").mkdir(parents=True, exist_ok=True)
    _diffusers_config(root / "transformer")
    g = torch.Generator().manual_seed(0)
    with _Writer(root / BFL_FILE, bfl_shapes) as bfl, \
            _Writer(root / DIFFUSERS_FILE, {n: s for p in parts.values() for n, s in p.items()}) as diffusers:
        for i, (key, shape) in enumerate(bfl_shapes.items()):
            tensor = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            bfl.write(key, tensor)
            for name, part in bfl_to_diffusers({key: tensor}).items():
                diffusers.write(name, part)
            print(f"\rwriting {i + 1}/{len(bfl_shapes)} tensors", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def _diffusers_config(folder: Path) -> None:
    import torch
    from diffusers import Flux2Transformer2DModel

    from diffcore_flux2.model import VARIANTS

    p = VARIANTS["klein-4b"]
    with torch.device("meta"):
        model = Flux2Transformer2DModel(num_layers=p.depth, num_single_layers=p.depth_single_blocks,
                                        num_attention_heads=p.num_heads, attention_head_dim=p.head_dim,
                                        joint_attention_dim=p.context_in_dim, guidance_embeds=p.guidance_embed)
    model.save_config(folder)


class _Writer:
    """A safetensors file written in one pass: the header from the shapes first, then each tensor's
    bytes in the header's order (https://github.com/huggingface/safetensors#format)."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]]):
        self.path, self.order, offset, header = path, list(shapes), 0, {"__metadata__": {"format": "pt"}}
        for name, shape in shapes.items():
            size = 2 * _numel(shape)  # bf16
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        self.header = text + b" " * (-len(text) % 8)
        self.next = 0

    def __enter__(self) -> _Writer:
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.file = open(self.tmp, "wb")
        self.file.write(struct.pack("<Q", len(self.header)) + self.header)
        return self

    def write(self, name: str, tensor) -> None:
        import torch

        if name != self.order[self.next]:
            raise RuntimeError(f"{self.path.name}: got {name}, the header has {self.order[self.next]} next")
        self.file.write(tensor.contiguous().view(torch.uint8).numpy().data)
        self.next += 1

    def __exit__(self, kind, *_) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if kind is None:
            os.replace(self.tmp, self.path)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# -- one measurement, in its own process -------------------------------------------------------
def measure(loader: str, root: Path) -> dict[str, float]:
    import torch

    if loader.startswith("diffcore"):
        from diffcore_flux2.load import load_transformer

        path = root / (BFL_FILE if "BFL" in loader else "transformer")

        def load():
            return load_transformer(path, variant="klein-4b", dtype=torch.bfloat16)
    else:
        from diffusers import Flux2Transformer2DModel

        def load():
            return Flux2Transformer2DModel.from_pretrained(root / "transformer", torch_dtype=torch.bfloat16)

    before = _peak_rss()
    start = time.perf_counter()
    model = load()
    loaded = time.perf_counter()
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            flat = t.detach().reshape(-1)
            flat[::max(1, PAGE // t.element_size())].float().sum()
    ready = time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    if any(p.is_meta or p.dtype != torch.bfloat16 or p.device.type != "cpu" for p in model.parameters()):
        raise RuntimeError(f"{loader}: the model is not all bf16 on the CPU")
    return {"load_s": loaded - start, "ready_s": ready - start, "peak_rss_gb": _peak_rss() / 1e9,
            "rss_before_gb": before / 1e9, "params": params}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _evict(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _prefetch(file: Path) -> None:
    with open(file, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def _child(loader: str, root: Path) -> dict[str, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--measure", loader, str(root.parent)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{loader} failed:\n{done.stderr[-4000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", default="/tmp", help="where the checkpoint is (or will be) written")
    parser.add_argument("--warm", type=int, default=2, help="warm runs per loader (the fastest counts)")
    parser.add_argument("--measure", choices=list(LOADERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.dir) / NAME
    if args.measure:
        print(json.dumps(measure(args.measure, root)))
        return
    if not (root / BFL_FILE).exists() or not (root / DIFFUSERS_FILE).exists():
        started = time.perf_counter()
        write_checkpoint(root)
        print(f"wrote {root} in {time.perf_counter() - started:.0f} s")
    size = (root / DIFFUSERS_FILE).stat().st_size
    print(f"checkpoint: klein-4b shapes, bf16, {size / 1e9:.2f} GB per layout ({root})")
    results: dict[tuple[str, str], dict[str, float]] = {}
    for cache in ["cold"] + ["warm"] * args.warm:
        for loader, file in LOADERS.items():
            if cache == "cold":
                _evict(root / file)
            else:
                _prefetch(root / file)
            r = _child(loader, root)
            print(f"{cache:4}  {loader:28}  load {r['load_s']:6.2f} s  ready {r['ready_s']:6.2f} s  "
                  f"process {r['process_s']:6.2f} s  peak RSS {r['peak_rss_gb']:5.2f} GB "
                  f"({r['peak_rss_gb'] / (size / 1e9):.2f}x checkpoint; {r['rss_before_gb']:.2f} GB before loading)",
                  flush=True)
            best = results.get((loader, cache))
            if best is None or r["ready_s"] < best["ready_s"]:
                results[loader, cache] = r
    for cache in ("cold", "warm"):
        base = results["diffusers from_pretrained", cache]
        for loader in ("diffcore (diffusers layout)", "diffcore (BFL file)"):
            r = results[loader, cache]
            print(f"{cache}: {loader} / diffusers: ready {r['ready_s'] / base['ready_s']:.2f}x, "
                  f"process {r['process_s'] / base['process_s']:.2f}x, "
                  f"peak RSS {r['peak_rss_gb'] / base['peak_rss_gb']:.2f}x")


if __name__ == "__main__":
    main()
