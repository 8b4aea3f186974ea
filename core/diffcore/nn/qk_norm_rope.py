"""From fused ``qkv`` projections to an attention's inputs: split into heads, RMS-norm q and k per
head, join the streams' tokens, rotate q and k by RoPE. On a GPU, q and k in one Triton kernel.

Why a kernel: as ATen ops, an eager CUDA forward makes q and k contiguous, normalises them, joins
the streams (``torch.cat``), copies them to float32, rotates them and rounds them back: 10-16
launches per block, each a pass over q and k. A 1024x1024 FLUX.1-dev forward moved 48 of its
99.5 GB of non-matmul traffic that way (``benchmarks/kernel_trace.py``, modelled). The kernel
reads q and k once from the projection's output and writes them once, already joined (6.6 GB).

Arithmetic: the composite path's (``composite_heads``, which runs everywhere else): float32
statistics, the normed value rounded to the input's dtype, its rotation in float32 rounded again.
Only the order of the float32 sums differs, so a value can differ by one unit in the last place
of bf16 / fp16 where the composite's float32 result lies on a rounding boundary
(``tests/nn/test_qk_norm_rope.py`` runs the kernel in Triton's interpreter).

The kernel runs on CUDA tensors in bf16 / fp16 with Triton installed (PyTorch's CUDA wheels bring
it), power-of-two head sizes, diffcore's ``RMSNorm`` or ``nn.RMSNorm`` without hooks, and nothing
that needs gradients. Under ``torch.compile`` the composite is traced instead: inductor fuses it
itself. ``DIFFCORE_FUSED_QK=0`` turns the kernel off (the composite, bit for bit as before); a
kernel that fails to build or launch turns itself off with a warning.
On the meta device the op's shape function runs, so ``kernel_trace.py`` counts what CUDA runs.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from diffcore.nn.embeddings import apply_rope
from diffcore.nn.norms import RMSNorm

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the composite path
    triton = None

__all__ = ["attention_heads", "composite_heads"]

ENABLED = os.environ.get("DIFFCORE_FUSED_QK", "1").strip().lower() not in ("0", "false", "no", "off")
ROWS = 32   # tokens per program: a (32, head_dim) tile of one head
# where the kernel runs (the tests add "cpu" under TRITON_INTERPRET=1); meta runs its shape function
KERNEL_DEVICES = {"cuda"}

Stream = tuple[Tensor, nn.Module, nn.Module]   # (qkv projection output, query norm, key norm)


def attention_heads(streams: Sequence[Stream], heads: int, pe: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Each stream's ``qkv`` (batch, tokens, 3 * dim), [q | k | v] with heads inside each, and its
    query and key norms -> q, k, v of the streams' tokens joined in order, each (batch, heads,
    tokens, head_dim); q and k normed per head, then rotated by ``pe`` ((1 or batch, 1, tokens,
    head_dim / 2) complex) where given. v stays a view of ``qkv`` for a single stream."""
    norms = _kernel_norms(streams, heads, pe)
    if norms is None:
        return composite_heads(streams, heads, pe)
    width = streams[0][0].shape[-1] // 3
    try:
        qk = torch.ops.diffcore.qk_norm_rope([s[0][..., :2 * width] for s in streams], [w for w, _ in norms],
                                             [eps for _, eps in norms], pe, heads)
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # a Triton or a GPU that cannot build the kernel: the ATen ops from now on
        _give_up(error)
        return composite_heads(streams, heads, pe)
    q, k = rearrange(qk, "K B L H D -> K B H L D")   # tokens-major memory, as v's: SDPA's output too
    vs = [rearrange(s[0][..., 2 * width:], "B L (H D) -> B H L D", H=heads) for s in streams]
    return q, k, vs[0] if len(vs) == 1 else torch.cat(vs, dim=2)


def composite_heads(streams: Sequence[Stream], heads: int, pe: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """``attention_heads`` as ATen ops: what runs on CPUs, under autograd and under torch.compile."""
    parts = []
    for qkv, query_norm, key_norm in streams:
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=heads)
        parts.append((query_norm(q).to(v), key_norm(k).to(v), v))
    q, k, v = parts[0] if len(parts) == 1 else [torch.cat(p, dim=2) for p in zip(*parts)]
    if pe is not None:
        q = apply_rope(q, pe)
        k = apply_rope(k, pe)   # one at a time: the normed q is freed as its rotation is made
    return q, k, v


def _give_up(error: Exception) -> None:
    global ENABLED
    ENABLED = False
    warnings.warn(f"diffcore's fused q/k kernel failed ({type(error).__name__}: {error}); q and k are "
                  "prepared by ATen ops from now on (the same values, more memory traffic)", RuntimeWarning,
                  stacklevel=3)


def _norm_params(norm: nn.Module, dtype: torch.dtype) -> tuple[Tensor, float] | None:
    """(scale, eps) of an RMS norm the kernel computes as its module does for ``dtype`` input, else
    None (``nn.RMSNorm`` multiplies by its weight in the weight's dtype: only where that is q's)."""
    if norm._forward_hooks or norm._forward_pre_hooks or "forward" in norm.__dict__:
        return None
    if type(norm) is RMSNorm:
        return norm.scale, norm.eps
    if type(norm) is nn.RMSNorm and norm.weight is not None and norm.eps is not None and norm.weight.dtype == dtype:
        return norm.weight, norm.eps
    return None


def _kernel_norms(streams: Sequence[Stream], heads: int, pe: Tensor | None) -> list[tuple[Tensor, float]] | None:
    """Each stream's query and key norm as (scale, eps) where the kernel may run on these inputs;
    None where the ATen ops must."""
    first = streams[0][0]
    if not ENABLED or torch.compiler.is_compiling():
        return None
    if not (first.device.type == "meta" or (first.device.type in KERNEL_DEVICES and triton is not None)):
        return None
    head_dim = first.shape[-1] // (3 * heads)
    if first.dtype not in (torch.bfloat16, torch.float16) or head_dim < 16 or head_dim & (head_dim - 1):
        return None
    for qkv, *_ in streams:
        if (qkv.dim() != 3 or qkv.shape[0] != first.shape[0] or qkv.shape[-1] != 3 * heads * head_dim
                or qkv.dtype != first.dtype or qkv.device != first.device or qkv.stride(-1) != 1):
            return None
    norms = [_norm_params(n, first.dtype) for _, *pair in streams for n in pair]
    if any(n is None for n in norms):
        return None
    tensors = [s[0] for s in streams] + [w for w, _ in norms] + ([pe] if pe is not None else [])
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    if pe is not None:
        tokens = sum(s[0].shape[1] for s in streams)
        if not (pe.dtype == torch.complex64 and pe.dim() == 4 and pe.shape[0] in (1, first.shape[0])
                and tuple(pe.shape[1:]) == (1, tokens, head_dim // 2) and pe.stride(-1) == 1):
            return None
    return norms


@torch.library.custom_op("diffcore::qk_norm_rope", mutates_args=())
def _qk_norm_rope(qks: list[Tensor], scales: list[Tensor], eps: list[float], pe: Tensor | None,
                  heads: int) -> Tensor:
    """q and k of the joined streams, normed and rotated: (2, batch, tokens, heads, head_dim).
    ``qks``: each stream's [q | k] columns (batch, tokens, 2 * dim); ``scales`` / ``eps``: its
    query's then its key's norm."""
    out = _empty_heads(qks, heads)
    run_kernel(qks, scales, eps, pe, heads, out)
    return out


@_qk_norm_rope.register_fake
def _(qks: list[Tensor], scales: list[Tensor], eps: list[float], pe: Tensor | None, heads: int) -> Tensor:
    return _empty_heads(qks, heads)


def _empty_heads(qks: list[Tensor], heads: int) -> Tensor:
    batch, width = qks[0].shape[0], qks[0].shape[-1] // 2
    tokens = sum(x.shape[1] for x in qks)
    return qks[0].new_empty((2, batch, tokens, heads, width // heads))


def run_kernel(qks: Sequence[Tensor], scales: Sequence[Tensor], eps: Sequence[float], pe: Tensor | None,
               heads: int, out: Tensor) -> None:
    """Launch the kernel once per stream, each writing its tokens' rows of ``out`` ((2, batch, tokens,
    heads, head_dim), head_dim contiguous). Any device Triton runs on (its interpreter: the CPU);
    on the tensors' GPU, as Triton launches on the current one."""
    rotate = pe is not None
    angles = torch.view_as_real(pe) if rotate else out   # (.., tokens, head_dim / 2, 2) float32
    batch_stride = angles.stride(0) if rotate and pe.shape[0] > 1 else 0
    offset = 0
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        for i, x in enumerate(qks):
            grid = (triton.cdiv(x.shape[1], ROWS), x.shape[0] * 2 * heads)
            _kernel[grid](x, scales[2 * i], scales[2 * i + 1], angles, out, x.shape[1], offset, heads,
                          x.stride(0), x.stride(1), batch_stride, angles.stride(2) if rotate else 0,
                          out.stride(0), out.stride(1), out.stride(2), out.stride(3), eps[2 * i], eps[2 * i + 1],
                          HALF=out.shape[-1] // 2, ROTATE=rotate, BF16=out.dtype == torch.bfloat16, ROWS=ROWS)
            offset += x.shape[1]


if triton is not None:
    @triton.jit
    def _rounded(x, BF16: tl.constexpr):
        """float32 ``x`` rounded to the nearest bf16 (``BF16``) or fp16, ties to even, kept in float32.
        bf16 through its bits: CUDA's cast rounds so too, but Triton's interpreter truncates."""
        if BF16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
            return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
        else:
            return x.to(tl.float16).to(tl.float32)

    @triton.jit
    def _kernel(x, q_scale, k_scale, angles, out, tokens, offset, heads, x_batch, x_token, pe_batch, pe_token,
                out_qk, out_batch, out_token, out_head, q_eps, k_eps, HALF: tl.constexpr, ROTATE: tl.constexpr,
                BF16: tl.constexpr, ROWS: tl.constexpr):
        """One program: ``ROWS`` tokens of one head of q or of k (program_id(1) = batch, q|k, head).
        Channels are read as the pairs RoPE rotates, (2j, 2j + 1), so no tile is reshaped."""
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        batch = (tl.program_id(1) // (2 * heads)).to(tl.int64)   # offsets past 2^31 at large batches
        head = tl.program_id(1) % (2 * heads)
        is_q = head < heads
        pair = tl.arange(0, HALF)
        live = (row < tokens)[:, None]
        src = x + batch * x_batch + row[:, None] * x_token + head * 2 * HALF + 2 * pair[None, :]
        even = tl.load(src, mask=live, other=0.0).to(tl.float32)
        odd = tl.load(src + 1, mask=live, other=0.0).to(tl.float32)
        rstd = tl.rsqrt((tl.sum(even * even, 1) + tl.sum(odd * odd, 1)) / (2 * HALF) + tl.where(is_q, q_eps, k_eps))
        scale_even = tl.where(is_q, tl.load(q_scale + 2 * pair), tl.load(k_scale + 2 * pair)).to(tl.float32)
        scale_odd = tl.where(is_q, tl.load(q_scale + 2 * pair + 1), tl.load(k_scale + 2 * pair + 1)).to(tl.float32)
        # the scale and the norm's output in q's dtype, as the composite path rounds them
        even = _rounded(even * rstd[:, None] * _rounded(scale_even, BF16)[None, :], BF16)
        odd = _rounded(odd * rstd[:, None] * _rounded(scale_odd, BF16)[None, :], BF16)
        if ROTATE:
            at = angles + batch * pe_batch + (offset + row[:, None]) * pe_token + 2 * pair[None, :]
            cos = tl.load(at, mask=live, other=0.0)
            sin = tl.load(at + 1, mask=live, other=0.0)
            even, odd = even * cos - odd * sin, even * sin + odd * cos
        dst = (out + (head // heads).to(tl.int64) * out_qk + batch * out_batch + (head % heads) * out_head
               + (offset + row[:, None]) * out_token + 2 * pair[None, :])
        dtype = out.dtype.element_ty
        tl.store(dst, _rounded(even, BF16).to(dtype), mask=live)   # exact: already representable
        tl.store(dst + 1, _rounded(odd, BF16).to(dtype), mask=live)
