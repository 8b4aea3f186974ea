"""The fused q/k kernel (``diffcore.nn.qk_norm_rope``) run by Triton's interpreter on the CPU, against
the composite ATen path. A script, not a test module: ``TRITON_INTERPRET=1`` must be set before
Triton is imported, so ``test_qk_norm_rope.py`` runs it in a fresh interpreter.

Prints one JSON line per case: the largest difference in units of the last place (ulp) of the
output's dtype, the fraction of values that differ, and how often the kernel ran.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402
from torch import nn  # noqa: E402

from diffcore.nn import qk_norm_rope  # noqa: E402
from diffcore.nn.norms import RMSNorm  # noqa: E402

qk_norm_rope.KERNEL_DEVICES.add("cpu")
CALLS = [0]
_run = qk_norm_rope.run_kernel


def counted(*args, **kwargs):
    CALLS[0] += 1
    return _run(*args, **kwargs)


qk_norm_rope.run_kernel = counted


def ulps(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Largest |a - b| in ulps of b's magnitude (in a's dtype), and the fraction of elements that differ."""
    eps = torch.finfo(a.dtype).eps
    a, b = a.float(), b.float()
    unit = torch.exp2(torch.floor(torch.log2(b.abs().clamp_min(1e-30)))) * eps
    return float(((a - b).abs() / unit).max()), float((a != b).float().mean())


def norm(kind: str, dim: int, dtype: torch.dtype, eps: float) -> nn.Module:
    layer = RMSNorm(dim, eps) if kind == "diffcore" else nn.RMSNorm(dim, eps=eps)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(1.0, 0.5)
    return layer.to(dtype)


def unit_cases() -> None:
    batch, heads = 2, 3
    grid = itertools.product((torch.bfloat16, torch.float16), (16, 64), ((7,), (5, 37)), (None, 1, batch),
                             ("diffcore", "torch"))
    for dtype, head_dim, lengths, pe_batch, kind in grid:
        torch.manual_seed(len(lengths) * 100 + head_dim)
        streams = [(torch.randn(batch, n, 3 * heads * head_dim).mul(4).to(dtype),
                    norm(kind, head_dim, dtype, 1e-6), norm(kind, head_dim, dtype, 1e-5)) for n in lengths]
        pe = None
        if pe_batch is not None:
            angles = torch.rand(pe_batch, 1, sum(lengths), head_dim // 2) * 50
            pe = torch.polar(torch.ones_like(angles), angles)
        before = CALLS[0]
        with torch.no_grad():
            fused = qk_norm_rope.attention_heads(streams, heads, pe)
            with_ops = qk_norm_rope.composite_heads(streams, heads, pe)
        worst = [ulps(a, b) for a, b in zip(fused[:2], with_ops[:2])]
        print(json.dumps(dict(case="unit", dtype=str(dtype), head_dim=head_dim, lengths=lengths, pe_batch=pe_batch,
                              norm=kind, ulps=max(w[0] for w in worst), differ=max(w[1] for w in worst),
                              v_equal=bool(torch.equal(fused[2], with_ops[2])), kernel_runs=CALLS[0] - before)))


def network_cases() -> None:
    """Whole tiny networks in bf16: every attention through the kernel, then without it."""
    sys.path.insert(0, os.path.dirname(__file__))
    import conftest

    for name in ("flux1", "flux2", "sd3"):
        builder = getattr(conftest, f"{name}_case")
        torch.manual_seed(0)
        model, args, kwargs = builder()
        model = model.to(torch.bfloat16).eval()
        cast = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in kwargs.items()}
        outs, runs = [], []
        for enabled in (True, False):
            qk_norm_rope.ENABLED = enabled
            before = CALLS[0]
            with torch.no_grad():
                outs.append(model(*args, **cast))
            runs.append(CALLS[0] - before)
        qk_norm_rope.ENABLED = True
        u, d = ulps(outs[0], outs[1])
        print(json.dumps(dict(case="network", family=name, ulps=u, differ=d, kernel_runs=runs[0],
                              kernel_runs_disabled=runs[1])))


if __name__ == "__main__":
    unit_cases()
    network_cases()
