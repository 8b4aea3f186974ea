"""What each guidance method costs per sampling step, next to no guidance and plain CFG.

One guided step (``GuidedDenoiser``: branches, attention patches, the network, ``combine``) of a
DiT on CIFAR-shaped images (32 x 32 x 3, patch 2: 256 tokens) at a mid size, hidden 192 in 3 heads
of 64, 6 blocks, so the tokens outnumber the width as at FLUX's 1024-pixel resolutions and
attention is a real share of the time. Batch 8, fp32, CPU, random weights, a mid-schedule step
(step 3 of 10, after CFG-Zero*'s zero-init). Every method runs once per round, in an order that
rotates each round, so a busy machine slows all of them alike; the figures are medians over the
rounds of the per-round times and of the per-round ratios. One thread by default: on a shared
two-core machine a second thread mostly measures the scheduler.

Issue targets: NAG-PAG within 1.15x of no guidance; PAG about one extra forward (as CFG alone; as
a forward of 3 x 8 rows when added to CFG, listed as a reference row: on a CPU a forward's time
grows a little faster than its rows, so that is not exactly 1.5x CFG).

    python benchmarks/guidance_cost.py [--threads 1] [--rounds 11] [--set depth=12 hidden=384 heads=6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

DEFAULT_MODEL = ["hidden=192", "depth=6", "heads=3"]
BATCH, STEPS, STEP = 8, 10, 3


def build_bundle(variant: str, overrides: list[str]) -> Any:
    from diffcore.api import registry
    from diffcore_guidance.cli import parse_overrides

    comp = registry("models").get("dit")
    bundle = comp.build(comp.config(variant=variant, **parse_overrides(overrides)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # adaLN-Zero starts every block at the identity; random weights run like trained ones
        for p in bundle.network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    bundle.network.eval()
    return bundle


def methods(bundle: Any) -> dict[str, list[Any]]:
    """Label -> guidance chain. Two layers: blocks at a third and two thirds of the depth."""
    from diffcore.sampling.cfg import CFG
    from diffcore_guidance.attention import NAG, NAGPAG, PAG
    from diffcore_guidance.learned import LearnedGuidance
    from diffcore_guidance.models import create_conv_guidance_model, create_mlp_guidance_model
    from diffcore_guidance.prediction import APG, CFGZeroStar

    p = bundle.network.params
    two = [f"blocks.{p.depth // 3}.attn", f"blocks.{2 * p.depth // 3}.attn"]
    # the train-guidance job's default sizes: hidden 64, 3 layers, one pixel a token
    mlp = create_mlp_guidance_model(p.in_channels, num_classes=p.num_classes, hidden_dim=64, num_layers=3).eval()
    conv = create_conv_guidance_model(p.in_channels, num_classes=p.num_classes, hidden_channels=64,
                                      num_blocks=3, patch=1).eval()
    return {
        "none": [],
        "CFG": [CFG(scale=4.0)],
        "APG": [APG()],
        "CFG-Zero*": [CFGZeroStar()],
        "PAG, 2 layers": [PAG(layers=two)],
        "CFG + PAG, 2 layers": [CFG(scale=4.0), PAG(layers=two)],
        "NAG, all layers": [NAG()],
        "NAG-PAG, 2 layers": [NAGPAG(layers=two)],
        "NAG-PAG, all layers": [NAGPAG(layers=["*"])],
        "CFG + NAG-PAG, 2 layers": [CFG(scale=4.0), NAGPAG(layers=two)],
        "learned MLP": [LearnedGuidance(model=mlp)],
        "learned conv": [LearnedGuidance(model=conv)],
    }


def one_step(bundle: Any, chain: list[Any], batch: int = BATCH) -> Callable[[], torch.Tensor]:
    """A closure running guided step ``STEP`` of ``STEPS`` on fixed noise (the sampler's model call)."""
    from diffcore.models import GenerationRequest
    from diffcore.sampling.engine import GuidedDenoiser

    request = GenerationRequest(batch=batch, labels=torch.arange(batch) % bundle.num_classes)
    sigmas = torch.linspace(1.0, 0.0, STEPS + 1)
    x = torch.randn((batch, *bundle.latent_shape(request)), generator=torch.Generator().manual_seed(1))
    denoiser = GuidedDenoiser(bundle, bundle.conditions(request), chain, sigmas)
    sigma = sigmas[STEP].expand(batch)
    return lambda: denoiser(x * sigma[0], sigma)


def rows_per_step(bundle: Any, step: Callable[[], torch.Tensor]) -> list[int]:
    """The batch size of each network forward in one step."""
    rows: list[int] = []
    handle = bundle.network.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        step()
    finally:
        handle.remove()
    return rows


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--rounds", type=int, default=11, help="timed rounds (every method once a round)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--variant", default="cifar", help="DiT variant (default cifar: 32 x 32 x 3, 10 classes)")
    parser.add_argument("--set", dest="overrides", nargs="*", default=DEFAULT_MODEL, metavar="KEY=VALUE",
                        help=f"DiT config fields (default: {' '.join(DEFAULT_MODEL)})")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bundle = build_bundle(args.variant, args.overrides)
    steps = {name: one_step(bundle, chain) for name, chain in methods(bundle).items()}
    # the network alone on as many rows as CFG's and CFG + PAG's forwards: what batching costs by itself
    steps |= {f"none, batch {n * BATCH} (reference)": one_step(bundle, [], n * BATCH) for n in (2, 3)}
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        rows = {name: rows_per_step(bundle, step) for name, step in steps.items()}
        for r in range(args.warmup + args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                elapsed = timed(steps[name])
                if r >= args.warmup:
                    times[name].append(elapsed)

    p = bundle.network.params
    load = os.getloadavg()
    print(f"DiT {args.variant} {' '.join(args.overrides)}: hidden {p.hidden}, {p.depth} blocks, {p.heads} heads, "
          f"{p.tokens} tokens, {p.in_channels}x{p.image_size}x{p.image_size}; batch {BATCH}, fp32, "
          f"{torch.get_num_threads()} thread(s); step {STEP} of {STEPS}; {args.rounds} interleaved rounds")
    print(f"load average (1, 5, 15 min) at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    print()
    def ratio(name: str, base: str) -> float:
        return statistics.median(a / b for a, b in zip(times[name], times[base]))

    print(f"| {'method':<28} | {'forwards (rows)':<15} | {'ms / step':>9} | {'x none':>6} | {'x CFG':>6} |")
    print(f"|{'-' * 30}|{'-' * 17}|{'-' * 11}|{'-' * 8}|{'-' * 8}|")
    for name in names:
        ms = 1000 * statistics.median(times[name])
        shape = f"{len(rows[name])} ({' + '.join(str(n) for n in rows[name])})"
        print(f"| {name:<28} | {shape:<15} | {ms:9.1f} | {ratio(name, 'none'):6.3f} | {ratio(name, 'CFG'):6.3f} |")
    print()
    print(f"NAG-PAG (2 layers) / none: {ratio('NAG-PAG, 2 layers', 'none'):.3f}, "
          f"all layers: {ratio('NAG-PAG, all layers', 'none'):.3f} (target <= 1.15)")
    print(f"PAG (2 layers) / CFG: {ratio('PAG, 2 layers', 'CFG'):.3f}; CFG + PAG / the network on "
          f"{3 * BATCH} rows: {ratio('CFG + PAG, 2 layers', f'none, batch {3 * BATCH} (reference)'):.3f} "
          f"(one extra forward: both about 1)")

if __name__ == "__main__":
    main()
