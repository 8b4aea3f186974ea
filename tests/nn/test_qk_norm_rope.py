"""The attention's inputs from fused qkv projections: the Triton kernel equals the composite ATen
path (run by Triton's interpreter on the CPU), and it runs only where it may (checked on the meta
device, which takes the kernel's path without a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from diffcore.nn import qk_norm_rope
from diffcore.nn.norms import RMSNorm

SCRIPT = Path(__file__).with_name("interpreted_qk_kernel.py")


@pytest.fixture(scope="module")
def interpreted() -> list[dict]:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def test_kernel_matches_composite_bit_for_bit_in_bf16(interpreted):
    units = [c for c in interpreted if c["case"] == "unit"]
    assert len(units) == 48 and all(c["kernel_runs"] == 1 and c["v_equal"] for c in units)
    bf16 = [c for c in units if c["dtype"] == "torch.bfloat16"]
    assert bf16 and all(c["ulps"] == 0 for c in bf16), bf16


def test_kernel_within_one_ulp_in_fp16(interpreted):
    """Only the order of float32 sums differs: a result on a rounding boundary may round the other way."""
    fp16 = [c for c in interpreted if c.get("dtype") == "torch.float16"]
    assert fp16 and all(c["ulps"] <= 1 and c["differ"] < 1e-3 for c in fp16), fp16


@pytest.mark.parametrize("family", ["flux1", "flux2", "sd3"])
def test_networks_in_bf16_same_with_and_without_the_kernel(interpreted, family):
    (case,) = [c for c in interpreted if c.get("family") == family]
    assert case["kernel_runs"] > 0 and case["kernel_runs_disabled"] == 0
    assert case["differ"] <= 0.01 and case["ulps"] <= 8, case


class Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def streams(dtype=torch.bfloat16, device="meta", lengths=(3, 5), heads=2, head_dim=16, grad=False):
    out = []
    for n in lengths:
        qkv = torch.randn(2, n, 3 * heads * head_dim, dtype=dtype, device=device, requires_grad=grad)
        out.append((qkv, RMSNorm(head_dim).to(device, dtype), nn.RMSNorm(head_dim, eps=1e-6).to(device, dtype)))
    return out


def pe_for(tokens: int, head_dim: int = 16, device="meta") -> torch.Tensor:
    return torch.polar(torch.ones(1, 1, tokens, head_dim // 2, device=device),
                       torch.zeros(1, 1, tokens, head_dim // 2, device=device))


def ran_kernel(parts, heads=2, pe=None, autograd=False) -> bool:
    """Whether ``attention_heads`` launched the kernel (outside autograd unless ``autograd``);
    its results have the composite's shapes and dtypes either way."""
    with Ops() as ops, torch.set_grad_enabled(autograd):
        q, k, v = qk_norm_rope.attention_heads(parts, heads, pe)
    expected = qk_norm_rope.composite_heads(parts, heads, pe)
    for got, want in zip((q, k, v), expected):
        assert got.shape == want.shape and got.dtype == want.dtype
    return "diffcore::qk_norm_rope" in ops.names


def test_meta_bf16_takes_the_kernel_with_and_without_rope():
    assert ran_kernel(streams(), pe=pe_for(8))
    assert ran_kernel(streams(lengths=(4,)))
    assert ran_kernel(streams(grad=True), pe=pe_for(8))   # needs gradients, but autograd is off


@pytest.mark.parametrize("why", ["float32", "gradients", "trained norms", "hooked norm", "disabled", "odd head size", "cpu",
                                 "pe of other tokens"])
def test_composite_where_the_kernel_may_not_run(why, monkeypatch):
    parts, pe, head_dim, autograd = streams(), pe_for(8), 16, False
    if why == "float32":
        parts = streams(torch.float32)
    elif why == "gradients":
        parts, autograd = streams(grad=True), True
    elif why == "trained norms":   # the qkv projection frozen, the norms' scales trained
        autograd = True
    elif why == "hooked norm":
        parts[1][1].register_forward_hook(lambda *_: None)
    elif why == "disabled":
        monkeypatch.setattr(qk_norm_rope, "ENABLED", False)
    elif why == "odd head size":
        parts, head_dim = streams(head_dim=24), 24
        pe = pe_for(8, head_dim)
    elif why == "cpu":
        parts, pe = streams(device="cpu"), pe_for(8, device="cpu")
    elif why == "pe of other tokens":
        pe = pe_for(9)
        with pytest.raises(RuntimeError):   # the composite's broadcast error, as before the kernel
            ran_kernel(parts, pe=pe)
        return
    assert not ran_kernel(parts, pe=pe, autograd=autograd)


def test_composite_heads_is_split_norm_join_rotate():
    """The CPU path: each stream's heads normed by its own norms, joined in order, then rotated."""
    torch.manual_seed(0)
    parts = streams(torch.float32, "cpu")
    pe = torch.polar(torch.ones(1, 1, 8, 8), torch.rand(1, 1, 8, 8) * 6)
    q, k, v = qk_norm_rope.composite_heads(parts, 2, pe)
    qkv0, qn0, _ = parts[0]
    q0 = qkv0[..., :32].unflatten(-1, (2, 16)).transpose(1, 2)
    expected = qn0(q0)
    pairs = torch.view_as_complex(expected.unflatten(-1, (8, 2)).contiguous()) * pe[:, :, :3]
    torch.testing.assert_close(q[:, :, :3], torch.view_as_real(pairs).flatten(-2), rtol=0, atol=1e-6)
    torch.testing.assert_close(v[:, :, 3:], parts[1][0][..., 64:].unflatten(-1, (2, 16)).transpose(1, 2))


def test_a_kernel_that_fails_turns_itself_off_with_a_warning(monkeypatch):
    """A Triton or GPU that cannot build the kernel costs speed, never a forward."""
    pytest.importorskip("triton")
    monkeypatch.setattr(qk_norm_rope, "ENABLED", True)
    monkeypatch.setattr(qk_norm_rope, "KERNEL_DEVICES", {"cuda", "cpu"})
    tries = []

    def failing(*args):
        tries.append(1)
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(qk_norm_rope, "run_kernel", failing)
    parts, pe = streams(device="cpu"), torch.polar(torch.ones(1, 1, 8, 8), torch.rand(1, 1, 8, 8))
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="PTX assembly failed"):
            got = qk_norm_rope.attention_heads(parts, 2, pe)
        again = qk_norm_rope.attention_heads(parts, 2, pe)
        expected = qk_norm_rope.composite_heads(parts, 2, pe)
    assert len(tries) == 1 and not qk_norm_rope.ENABLED
    for a, b, c in zip(got, again, expected):
        assert torch.equal(a, c) and torch.equal(b, c)
