"""benchmarks/kernel_trace.py: the tracer counts kernels, bytes and FLOPs as eager CUDA would run
them (checked on functions whose counts are known by hand), and the whole report runs on tiny
configurations of every family, every block with each attention as one kernel."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "kernel_trace.py"


def _load():
    spec = importlib.util.spec_from_file_location("kernel_trace", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


kt = _load()


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


def test_elementwise_and_reduction_kernels_move_their_inputs_and_outputs():
    x = meta(4, 8)
    kernels = kt.trace(lambda: (x * 2 + 1).sum())
    assert [k.op.split()[0] for k in kernels] == ["mul.Tensor", "add.Tensor", "sum"]
    assert all(k.kind == "memory" and k.flops == 0 for k in kernels)
    assert [(k.read, k.written) for k in kernels] == [(128, 128), (128, 128), (128, 4)]
    assert kt.totals(kernels, kt.Machine(1e12, 1e15, 0.0)).memory_bytes == 644


def test_views_launch_nothing():
    x = meta(4, 8)

    def views():
        x.view(32), x.t(), x.transpose(0, 1), x.permute(1, 0), x[1:], x[0], x.unsqueeze(0).squeeze(0)
        x.expand(2, 4, 8), x.chunk(2), x.split(4, dim=1), x.unbind(0), x.detach(), x.reshape(2, 16)
        torch.view_as_real(torch.view_as_complex(x.view(4, 4, 2)))

    assert kt.trace(views) == []


def test_inplace_op_reads_and_writes_its_tensor_and_broadcast_inputs_count_once():
    x, row = meta(4, 8), meta(1, 8)
    (inplace,) = kt.trace(lambda: x.add_(1))
    assert (inplace.read, inplace.written) == (128, 128)
    (broadcast,) = kt.trace(lambda: x + row.expand(4, 8))
    assert (broadcast.read, broadcast.written) == (128 + 32, 128)


def test_matmuls_count_two_m_n_k_flops():
    m, k, n = 16, 32, 8
    (mm,) = kt.trace(lambda: meta(m, k) @ meta(k, n))
    assert mm.kind == "matmul" and mm.flops == 2 * m * n * k
    (addmm,) = kt.trace(lambda: F.linear(meta(3, m, k), meta(n, k), meta(n)))  # a 3-D input: a view, then addmm
    assert addmm.op.startswith("addmm") and addmm.flops == 2 * 3 * m * n * k
    (bmm,) = kt.trace(lambda: torch.bmm(meta(5, m, k), meta(5, k, n)))
    assert bmm.flops == 2 * 5 * m * n * k


def test_attention_is_one_kernel_whose_output_follows_the_layout_of_q():
    b, h, lq, lk, d = 1, 3, 10, 12, 16
    q = meta(b, lq, h, d, dtype=torch.bfloat16).transpose(1, 2)  # diffusers' layout: (B, L, H, D) in memory
    k, v = meta(b, h, lk, d, dtype=torch.bfloat16), meta(b, h, lk, d, dtype=torch.bfloat16)
    outputs = []
    kernels = kt.trace(lambda: outputs.append(F.scaled_dot_product_attention(q, k, v)))
    assert [x.kind for x in kernels] == ["attention"]
    assert kernels[0].flops == 4 * b * h * lq * lk * d
    assert kernels[0].read == 2 * (q.numel() + k.numel() + v.numel()) and kernels[0].written == 2 * q.numel()
    assert outputs[0].shape == (b, h, lq, d) and outputs[0].transpose(1, 2).is_contiguous()
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention   # restored after


def test_the_peak_counts_what_ops_made_and_is_still_referenced():
    x, weight = meta(64, 32), meta(16, 32)   # made outside: never counted, nor are views of them

    def step():
        a = x * 2                    # 8 KiB
        b = a + 1                    # 8 KiB more: 16 at once
        del a
        c = b.t().contiguous()       # a view of b holds nothing new; the copy 8 KiB: 16 again
        weight.t()
        return b.add_(1), c

    recorder = kt.traced(step)
    assert recorder.peak == 2 * 64 * 32 * 4
    assert recorder.live == 0        # the results were dropped once the call returned


def test_a_convolution_runs_at_the_matmul_rate_and_adds_its_bias_after():
    x, weight, bias = meta(1, 4, 16, 16), meta(8, 4, 3, 3), meta(8)
    conv, add = kt.trace(lambda: F.conv2d(x, weight, bias, padding=1))
    assert conv.kind == "matmul" and conv.flops == 2 * (8 * 16 * 16) * (4 * 3 * 3)
    assert (conv.read, conv.written) == (4 * (x.numel() + weight.numel()), 4 * 8 * 16 * 16)
    assert add.kind == "memory" and "bias" in add.op and add.written == conv.written
    (strided,) = kt.trace(lambda: F.conv2d(x, weight, None, stride=2, padding=1))   # no bias: one kernel
    assert strided.flops == 2 * (8 * 8 * 8) * (4 * 3 * 3)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_rms_norm_is_one_fused_kernel_after_a_copy_of_a_strided_input():
    x, w = meta(4, 6, 8, dtype=torch.bfloat16), meta(8, dtype=torch.bfloat16)
    (fused,) = kt.trace(lambda: F.rms_norm(x, (8,), w, 1e-6))
    assert fused.op.startswith("_fused_rms_norm") and fused.read == 2 * (x.numel() + 8)
    strided = kt.trace(lambda: F.rms_norm(x.transpose(0, 1), (8,), w, 1e-6))
    assert [k.op.split()[0] for k in strided] == ["clone", "_fused_rms_norm"]
    mixed = kt.trace(lambda: F.rms_norm(x, (8,), w.float(), 1e-6))   # dtypes differ: the composite ops
    assert len(mixed) > 2 and not any(k.op.startswith("_fused") for k in mixed)
    assert len(kt.trace(lambda: F.rms_norm(x, (8,), w, 1e-6), fused_norms=False)) > 1


def test_whole_forward_scopes_add_up_to_its_blocks():
    pytest.importorskip("diffusers")
    family = kt.CASES["flux1-dev"](True)
    block = len(kt.trace(family.blocks[0].ours))
    whole = kt.trace(family.whole.ours, family.whole.scopes[0])
    assert sum(k.scope == "double blocks" for k in whole) == family.blocks[0].count * block
    assert any(k.scope == "outside the blocks" for k in whole)


def test_tiny_report_prints_every_case_and_block(capsys):
    pytest.importorskip("diffusers")
    assert kt.main(["--tiny", "--ops"]) == 0
    out = capsys.readouterr().out
    blocks = {"flux1 tiny": ["double-stream block", "single-stream block"],
              "flux2 tiny-klein": ["double-stream block", "single-stream block"],
              "sd3 tiny": ["joint block"], "sdxl tiny": ["transformer block (64 wide)"]}
    for family, names in blocks.items():
        for table in [f"{name}, one block" for name in names] + ["blocks only", "whole forward"]:
            assert f"### {family} {table}" in out, (family, table, out[-3000:])
        assert f"{family} {names[0]}: ATen ops" in out
    # one attention per FLUX block; two in SDXL's (self, cross) and in tiny SD3's first (MMDiT-X's
    # second attention); both libraries
    assert out.count("|   attention kernels | 1 | 1 | 1.000 |") == 4
    assert out.count("|   attention kernels | 2 | 2 | 1.000 |") == 2
    assert "does not run on meta" not in out and "model: lower bound (ms)" in out
    assert "## sdxl tiny: a 8 x 8 latent, 77 text tokens, batch 1, bf16" in out
