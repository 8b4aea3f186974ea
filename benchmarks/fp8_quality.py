"""How far fp8 weights move a full-size network's prediction: one forward of FLUX.2 klein-4b and of
SDXL base at full size, in float32, bf16, bf16 with fp8-stored weights and with fp8 matmuls
(``diffcore.nn.fp8``), each compared with float32 and with bf16.

Why: fp8 halves the weights' memory and, on Hopper / Ada GPUs, doubles the matmul rate; what it
costs is error, and users choosing it want that error next to bf16's own. One forward is the
unit: a sampler step is that prediction times the step size.

The weights are random (normal, std 0.02; norm scales 1), not trained ones: trained weights have
outlier rows and channels, so read the figures as the rounding's order of magnitude, not as
image quality. Runs anywhere (CPU by default: 512 x 512 images, about 10 minutes on 2 cores for
both families); ``--tiny`` checks the script.

    python benchmarks/fp8_quality.py --size 512
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffcore.nn.fp8 import Float8Linear, store_fp8


@dataclass
class Case:
    network: nn.Module
    inputs: Callable[[torch.dtype], dict[str, Any]]   # dtype -> the forward's keyword arguments


def randomised(network: nn.Module, device: str, seed: int = 0) -> nn.Module:
    """``network`` (built on meta) materialised in bf16: weights normal(0, 0.02), norm scales 1."""
    network = network.to_empty(device=device).to(torch.bfloat16).eval()
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if p.ndim == 1 and name.endswith(("scale", "weight")):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return network


def flux2(size: int, tiny: bool, device: str) -> Case:
    import attrs

    from diffcore_flux2.model import VARIANTS, Flux2
    from diffcore_flux2.sampling import image_ids, text_ids

    p = VARIANTS["klein-4b"]
    if tiny:
        p = attrs.evolve(p, hidden_size=128, num_heads=2, depth=1, depth_single_blocks=2, context_in_dim=96,
                         axes_dim=(16, 16, 16, 16))
    with torch.device("meta"):
        network = Flux2(p)
    side, text = size // 16, (16 if tiny else 128)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, side * side, p.in_channels, generator=g), torch.randn(1, text, p.context_in_dim, generator=g)

    def inputs(dtype: torch.dtype) -> dict[str, Any]:
        return dict(x=x.to(device, dtype), x_ids=image_ids(side, side).to(device), timesteps=torch.tensor(
            [0.7], device=device, dtype=dtype), ctx=ctx.to(device, dtype), ctx_ids=text_ids(text).to(device))

    return Case(randomised(network, device), inputs)


def sdxl(size: int, tiny: bool, device: str) -> Case:
    from diffcore_sdxl.model import VARIANTS, UNet, label_vector

    p = VARIANTS["tiny" if tiny else "base-1.0"]
    with torch.device("meta"):
        network = UNet(p)
    side = size // 8
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, p.in_channels, side, side, generator=g), torch.randn(1, 77, p.context_dim, generator=g)
    pooled = torch.randn(1, p.adm_in_channels - 6 * p.time_embed_scalar_dim, generator=g)
    ids = torch.tensor([[float(size), size, 0, 0, size, size]])[:, :(p.adm_in_channels - pooled.shape[1]) //
                                                                 p.time_embed_scalar_dim]
    y = label_vector(pooled, ids, p.time_embed_scalar_dim)

    def inputs(dtype: torch.dtype) -> dict[str, Any]:
        return dict(x=x.to(device, dtype), timesteps=torch.tensor([500.0], device=device, dtype=dtype),
                    context=context.to(device, dtype), y=y.to(device, dtype))

    return Case(randomised(network, device), inputs)


CASES = {"flux2-klein-4b": flux2, "sdxl-base": sdxl}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def gib(network: nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in (*network.parameters(), *network.buffers())) / 2**30


def measure(name: str, args: argparse.Namespace) -> list[str]:
    """float32 first (in place: bf16 values are exact in float32), back to bf16, then fp8 in place."""
    case = CASES[name](args.size, args.tiny, args.device)
    net, outputs, sizes, seconds = case.network, {}, {}, {}

    def forward(label: str, dtype: torch.dtype) -> None:
        began = time.perf_counter()
        with torch.inference_mode():
            outputs[label] = net(**case.inputs(dtype)).float()
        seconds[label], sizes[label] = time.perf_counter() - began, gib(net)
        print(f"  {name} {label}: {seconds[label]:.0f} s", file=sys.stderr, flush=True)

    forward("bf16", torch.bfloat16)
    net.float()
    forward("float32", torch.float32)
    net.bfloat16()
    store_fp8(net, min_features=1 if args.tiny else 256)
    forward("fp8 weights, bf16 matmuls", torch.bfloat16)
    for layer in net.modules():
        if isinstance(layer, Float8Linear):
            layer.matmul = True
    forward("fp8 matmuls", torch.bfloat16)
    reference, bf16 = outputs["float32"], outputs["bf16"]
    lines = []
    for label in ("bf16", "fp8 weights, bf16 matmuls", "fp8 matmuls"):
        lines.append(f"| {name} | {label} | {sizes[label]:.2f} GiB | {relative(outputs[label], reference):.2e} | "
                     f"{'–' if label == 'bf16' else f'{relative(outputs[label], bf16):.2e}'} |")
    return lines


def measure_float32(name: str, args: argparse.Namespace) -> list[str]:
    """The rounding alone, every forward in float32 (for CPUs without native bf16, where a bf16
    forward of a full-size UNet takes a quarter of an hour): fp8 linear weights, then the
    convolutions rounded too."""
    case = CASES[name](args.size, args.tiny, args.device)
    net = case.network.float()
    with torch.inference_mode():
        reference = net(**case.inputs(torch.float32)).float()
    convs = tuple(n for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    lines = []
    for label, skip in (("fp8 linear weights, float32 compute", convs), ("fp8 linear and conv weights, float32 "
                                                                         "compute", ())):
        store_fp8(net, min_features=1 if args.tiny else 256, skip=skip)
        with torch.inference_mode():
            out = net(**case.inputs(torch.float32)).float()
        lines.append(f"| {name} | {label} | {gib(net):.2f} GiB | {relative(out, reference):.2e} | – |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--tiny", action="store_true", help="small configurations (to check the script)")
    parser.add_argument("--float32-compute", action="store_true",
                        help="the rounding alone, all in float32: for CPUs without native bf16")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.device}, torch {torch.__version__}, {args.size} x {args.size}, batch 1, random weights; "
          f"relative L2 error of one forward's prediction")
    print("| network | weights | weight memory | error vs float32 | error vs bf16 |")
    print("|---|---|---|---|---|")
    for name in args.cases:
        for line in (measure_float32 if args.float32_compute else measure)(name, args):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
