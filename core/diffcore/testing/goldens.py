"""Golden outputs: tensors recorded once, then held to bit for bit.

A change that must not move any result (a shared pipeline, a layer moved into a toolbox)
records the outputs before it starts (``DIFFCORE_RECORD_GOLDENS=1 pytest the_test.py``), commits
them, and the same test asserts ``torch.equal`` from then on. Floating point results depend on
the CPU (its model picks the library kernels, not only its SIMD level), the torch build and
the number of threads, so each file keeps that fingerprint: on a machine with another one the
comparison falls back to ``assert_close`` at 1e-4 (the same computation, summed in another order
over many sampling steps), and only the recording machine checks every bit.
"""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path

import torch

RECORD = "DIFFCORE_RECORD_GOLDENS"


def fingerprint() -> str:
    """What floating-point results depend on besides the code: torch, the CPU, its SIMD level, threads."""
    return (f"torch {torch.__version__}; {cpu_model()}; {torch.backends.cpu.get_cpu_capability()}; "
            f"{torch.get_num_threads()} threads")


@cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def check_golden(path: str | Path, tensors: dict[str, torch.Tensor], *, rtol: float = 1e-4,
                 atol: float = 1e-4) -> bool:
    """Compare ``tensors`` with the golden file ``path`` (a safetensors file); with
    ``DIFFCORE_RECORD_GOLDENS=1`` set, write it instead. Returns True when the comparison was bit
    for bit (the fingerprints agree), False when it was ``assert_close``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    if os.environ.get(RECORD, "") not in ("", "0"):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"fingerprint": fingerprint()})
        return True
    if not path.is_file():
        raise AssertionError(f"no golden file {path}: record it with {RECORD}=1 before changing the code")
    with safe_open(str(path), framework="pt") as f:
        recorded = f.metadata().get("fingerprint", "")
        golden = {name: f.get_tensor(name) for name in f.keys()}
    assert sorted(golden) == sorted(tensors), f"{path.name}: recorded {sorted(golden)}, got {sorted(tensors)}"
    exact = recorded == fingerprint()
    for name, expected in golden.items():
        if exact:
            assert torch.equal(tensors[name], expected), (
                f"{path.name}: {name!r} differs from the golden output (max |diff| "
                f"{(tensors[name].double() - expected.double()).abs().max():.3g}) on the machine that recorded it")
        else:
            torch.testing.assert_close(tensors[name], expected, rtol=rtol, atol=atol,
                                       msg=lambda m, name=name: f"{path.name}: {name!r}: {m}")
    return exact
