"""Memory of loading a FLUX.2 klein-4b transformer into fp8 weights on the CPU: reading the file in
bf16 and rounding after (``store_fp8``), against rounding each weight as it is read
(``rounding_on_load``, what a generate job's ``weight_dtype`` does), from a bf16 file and from a
ComfyUI-style fp8 file (linear weights in float8_e4m3fn, the rest bf16) and from a scaled one
(the same with a per-tensor ``weight_scale``, as Comfy-Org's ``fp8mixed`` files).

Each run is a fresh process with the file in the page cache; a thread samples the process's
``/proc/self/status`` every 2 ms. Reported: the load's seconds, the peak of anonymous memory
(``RssAnon``: what cannot be given back; the file's mapped pages are not in it), and once loaded
the resident set (``VmRSS``, mapped pages included) and the anonymous part of it. On a GPU the
same split decides the device's peak: rounding after first moves the whole bf16 network there;
``--device cuda`` loads onto the GPU and reports its peak allocated memory too.

The checkpoint is benchmarks/load.py's (random weights, klein-4b shapes; written under DIR once,
about 7.8 GB per layout); the fp8 file is made from it once. ``--tiny`` runs the same on a tiny
configuration, as the test does.

    python benchmarks/fp8_load.py [DIR] [--tiny] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

MODES = ("load, then round", "round while loading")
FILES = {"bf16 file": "bf16.safetensors", "fp8 file (ComfyUI)": "fp8.safetensors",
         "scaled fp8 file (ComfyUI)": "scaled.safetensors"}


def write_files(root: Path, tiny: bool) -> None:
    """The bf16 BFL file (load.py's, or a tiny one) and its fp8 twin, each once."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    bf16 = root / FILES["bf16 file"]
    if not bf16.exists():
        if tiny:
            from diffcore_flux2.model import VARIANTS, Flux2

            g = torch.Generator().manual_seed(0)
            state = {k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16)
                     for k, v in Flux2(VARIANTS["tiny"]).state_dict().items()}
            save_file(state, str(bf16))
        else:
            sys.path.insert(0, str(Path(__file__).parent))
            from load import BFL_FILE, NAME, write_checkpoint

            source = root.parent / NAME
            if not (source / BFL_FILE).exists():
                write_checkpoint(source)
            bf16.symlink_to(source / BFL_FILE)
    fp8 = root / FILES["fp8 file (ComfyUI)"]
    if not fp8.exists():
        with safe_open(str(bf16), framework="pt") as f:
            state = {k: (t.to(torch.float8_e4m3fn) if t.ndim == 2 and min(t.shape) >= 256 else t)
                     for k in f.keys() for t in [f.get_tensor(k)]}
        save_file(state, str(fp8))
        del state
    scaled = root / FILES["scaled fp8 file (ComfyUI)"]
    if not scaled.exists():
        state = {}
        with safe_open(str(bf16), framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                if t.ndim == 2 and min(t.shape) >= 256:
                    scale = t.abs().amax().float() / 448
                    state |= {k: (t.float() / scale).to(torch.float8_e4m3fn),
                              k.removesuffix(".weight") + ".weight_scale": scale}
                else:
                    state[k] = t
        save_file(state, str(scaled))
        del state


def _status() -> dict[str, int]:
    """VmRSS and RssAnon in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon"):
                out[name] = int(value.split()[0]) * 1024
    return out


def watched(load, device: str = "cpu") -> dict[str, float]:
    """Run ``load()`` (which returns a module), sampling anonymous memory every 2 ms: its seconds, the
    peak and what stays, the module's weight bytes and fp8 layers (and the GPU's peak on CUDA)."""
    import torch

    from diffcore.nn.fp8 import Float8Weight

    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _status()["RssAnon"])
            time.sleep(0.002)

    before = _status()["RssAnon"]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    net = load()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    after = _status()
    layers = [m for m in net.modules() if isinstance(m, Float8Weight)]
    weights = sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))
    return {"seconds": seconds, "peak_anon": max(peak[0], after["RssAnon"]) - before, "rss": after["VmRSS"],
            "anon": after["RssAnon"] - before, "weights": weights, "layers": len(layers),
            "device_peak": torch.cuda.max_memory_allocated() if cuda else None}


def measure(path: Path, mode: str, tiny: bool, device: str = "cpu") -> dict[str, float]:
    import torch

    from diffcore.nn.fp8_options import Rounding, rounding_on_load
    from diffcore_flux2.load import load_transformer

    rounding = Rounding(min_features=1) if tiny else Rounding()
    variant = "tiny" if tiny else "klein-4b"

    def load():
        if mode == "load, then round":
            net = load_transformer(path, variant=variant, dtype=torch.bfloat16, device=device)
            rounding.apply(net)
            return net
        with rounding_on_load(rounding):
            return load_transformer(path, variant=variant, dtype=torch.bfloat16, device=device)
    return watched(load, device)


def table_row(label: str, mode: str, r: dict, gpu: bool) -> str:
    gb = 1 / 2 ** 30
    return (f"| {label} | {mode} | {r['seconds']:.2f} | {r['peak_anon'] * gb:.3f} GiB | {r['rss'] * gb:.3f} GiB "
            f"| {r['anon'] * gb:.3f} GiB | {r['weights'] * gb:.3f} GiB | {r['layers']} |"
            + (f" {r['device_peak'] * gb:.3f} GiB |" if gpu else ""))


def warm(path: Path) -> None:
    """Read ``path`` (a file, or every file of a folder) into the page cache: both modes read it warm."""
    for file in ([path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())):
        with open(file, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def arguments(doc: str, what: str) -> argparse.Namespace:
    """The command line both load benchmarks take (``--measure`` runs one row, in a fresh process)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("dir", nargs="?", default="/tmp", help="where the files are (or will be) written")
    parser.add_argument("--tiny", action="store_true", help="a tiny configuration (the test's)")
    parser.add_argument("--device", default="cpu", help=f"where the {what} loads (cuda: its peak is reported too)")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args()


def print_table(script: str, args: argparse.Namespace, first: str, runs: list[tuple[Path, str, str]]) -> None:
    """One row per (path, label, mode) of ``runs``, each measured by ``script --measure`` in a fresh
    process with the file warm in the page cache."""
    gpu = args.device.startswith("cuda")
    print(f"loading onto {args.device}")
    print(f"| {first} | loading | seconds | peak anonymous | resident after | anonymous after | weights | fp8 layers |"
          + (" device peak |" if gpu else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""))
    for path, label, mode in runs:
        warm(path)
        done = subprocess.run([sys.executable, script, str(args.dir), "--measure", str(path), mode,
                               "--device", args.device, *(["--tiny"] if args.tiny else [])],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{label}, {mode} failed:\n{done.stderr[-4000:]}")
        print(table_row(label, mode, json.loads(done.stdout.strip().splitlines()[-1]), gpu), flush=True)


def main() -> None:
    args = arguments(__doc__, "network")
    root = Path(args.dir) / ("fp8-load-tiny" if args.tiny else "fp8-load-klein-4b")
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1], args.tiny, args.device)))
        return
    write_files(root, args.tiny)
    print_table(__file__, args, "file", [(root / name, label, mode) for label, name in FILES.items() for mode in MODES])


if __name__ == "__main__":
    main()
