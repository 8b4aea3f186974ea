"""The timing harness the side-by-side benchmarks share: run two callables interleaved (the order
alternating each iteration, so drift and other processes' load hit both alike) and report the
median ratio on the wall clock and on this process's CPU time (on a shared machine the second
counts only the time the work itself ran)."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any


def interleaved(ours: Callable[[], Any], reference: Callable[[], Any], *, iters: int,
                warmup: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per call: ``{"ours" | "reference": {"wall": [...], "cpu": [...]}}``."""
    for _ in range(warmup):
        ours(), reference()
    times = {name: {"wall": [], "cpu": []} for name in ("ours", "reference")}
    pair = [("ours", ours), ("reference", reference)]
    for i in range(iters):
        for name, fn in pair if i % 2 == 0 else pair[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def report(times: dict[str, dict[str, list[float]]], reference_name: str, target: float | None) -> None:
    """One line per clock: medians, median ratio ours / reference, and its quartiles (and the
    target ratio, when there is one)."""
    for clock in ("wall", "cpu"):
        ours, ref = times["ours"][clock], times["reference"][clock]
        ratios = [a / b for a, b in zip(ours, ref)]
        low, _, high = statistics.quantiles(ratios, n=4)
        print(f"{clock:>4}: median diffcore {statistics.median(ours) * 1e3:.1f} ms, {reference_name} "
              f"{statistics.median(ref) * 1e3:.1f} ms; median ratio {statistics.median(ratios):.3f} "
              f"(quartiles {low:.3f} .. {high:.3f}{'' if target is None else f'; target <= {target}'})")


def accuracy_line(ours: Callable[[], Any], reference: Callable[[], Any], exact: Callable[[], Any]) -> str:
    """Both fp32 outputs against the reference model run in float64: diffcore's error should be
    of the order of the reference's own (the two use different GEMMs, so they are not equal)."""
    truth = exact().double()
    errors = [(fn().double() - truth).abs().max().item() for fn in (ours, reference)]
    return (f"max abs error against the reference in float64: diffcore {errors[0]:.2e}, reference in fp32 "
            f"{errors[1]:.2e} (outputs up to {truth.abs().max().item():.3g})")


def step_arguments(description: str) -> argparse.Namespace:
    """The options every side-by-side step benchmark takes; sets torch's thread count."""
    import torch

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch intra-op threads (default: PyTorch's, one per core)")
    parser.add_argument("--iters", type=int, default=60, help="timed iterations of each model")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args
