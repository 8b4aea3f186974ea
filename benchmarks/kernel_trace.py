"""What each family's blocks launch on a GPU, diffcore against diffusers, counted without one.

Why: on an H100 diffcore's FLUX.1-dev transformer ran 1.08x slower than diffusers' in eager bf16
while FLUX.2 klein ran faster. Eager CUDA launches about one kernel per ATen op that is not a view,
and all but the matmuls and attention are bound by the bytes they move. So each block (and each
whole forward) runs once at full size on ``meta`` under a dispatch mode that records every op:
views cost nothing, matmuls their FLOPs, any other op one kernel reading its inputs (a broadcast
dimension once) and writing its outputs. Where CUDA differs from meta the trace follows CUDA:
attention is one flash kernel whose output keeps q's memory layout, ``F.rms_norm`` one fused kernel
(torch >= 2.9; ``--unfused-rms-norm`` for older), and norms copy a non-contiguous input first.

Compare kernels and the GB of the non-matmul kernels. The time is a model, a lower bound (each
kernel at its roofline, plus a cost per launch), not a measurement; ``--ops`` lists both sides'
ATen ops with their dtypes, the largest difference in bytes first. ``--tiny`` checks the script.

    python benchmarks/kernel_trace.py --ops
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

META = torch.device("meta")
DTYPE = torch.bfloat16
Run = Callable[[], Any]

# ATen ops that allocate or relabel memory and launch nothing (views are told by their schema)
NO_KERNEL = {"_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
             "_reshape_alias"}
# op -> index of its left matrix; FLOPs are 2 * numel(left) * columns of the right one
MATMULS = {"mm": 0, "bmm": 0, "mv": 0, "dot": 0, "_scaled_mm": 0, "_int_mm": 0, "addmm": 1, "baddbmm": 1,
           "addbmm": 1, "addmv": 1, "_addmm_activation": 1}
# CUDA kernels that make their input contiguous first (a copy the meta kernel does not show)
CONTIGUOUS_INPUT = {"native_layer_norm"}
SHORT = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32", torch.float64: "f64",
         torch.complex64: "c64", torch.complex128: "c128", torch.int64: "i64", torch.int32: "i32", torch.bool: "bool"}


@dataclass(frozen=True)
class Kernel:
    """One launch: what it is, the bytes it reads and writes, its FLOPs, where in the model it ran."""

    op: str
    kind: str  # "matmul", "attention" or "memory" (elementwise, reduction, copy: bound by bytes)
    read: int
    written: int
    flops: int = 0
    scope: str = ""

    @property
    def bytes(self) -> int:
        return self.read + self.written


def footprint(t: torch.Tensor) -> int:
    """Bytes of the distinct elements ``t`` addresses: a broadcast (stride 0) dimension counts once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def dense_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]


def op_name(func: torch._ops.OpOverload) -> str:
    base = func._schema.name.split("::")[-1]
    return base if func._overloadname == "default" else f"{base}.{func._overloadname}"


def is_view(func: torch._ops.OpOverload) -> bool:
    """Whether every output aliases an input without writing it (view, transpose, split, ...)."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def signature(op: str, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> str:
    """``op in-dtypes->out-dtypes``, so an upcast or a mixed-precision multiply shows as its own row."""
    def names(ts: Sequence[torch.Tensor]) -> str:
        return ",".join(dict.fromkeys(SHORT.get(t.dtype, str(t.dtype)) for t in ts))
    return f"{op} {names(inputs)}->{names(outputs)}"


class KernelTrace(TorchDispatchMode):
    """Records a ``Kernel`` per ATen op that launches one; ``scope`` labels what runs now. Also the
    bytes of the tensors that ops create and that are still referenced (``live``) and their most
    (``peak``): what a caching allocator holds for one call's activations, before rounding."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: list[Kernel] = []
        self.scope = ""
        self.live = self.peak = 0
        self._storages: dict[int, list[int]] = {}   # storage -> [tensors referring to it, its bytes]
        self._tensors: set[int] = set()

    def hold(self, t: torch.Tensor, view: bool = False) -> None:
        """Count ``t``'s storage as live until the last tensor made here that refers to it is freed;
        a ``view`` adds a reference to a storage made here, and nothing for a weight's or an input's."""
        if id(t) in self._tensors:   # an in-place op hands back its input
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._storages:
            self._storages[key][0] += 1
        elif view:
            return
        else:
            self._storages[key] = [1, storage.nbytes()]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._tensors.add(id(t))
        weakref.finalize(t, self._release, id(t), key)

    def _release(self, tensor: int, key: int) -> None:
        self._tensors.discard(tensor)
        entry = self._storages[key]
        entry[0] -= 1
        if not entry[0]:
            self.live -= entry[1]
            del self._storages[key]

    def add(self, op: str, kind: str, read: int, written: int, flops: int = 0) -> None:
        self.kernels.append(Kernel(op, kind, read, written, flops, self.scope))

    def contiguous_copy(self, t: torch.Tensor, inside: str) -> None:
        if not t.is_contiguous():
            self.add(signature(f"clone (in {inside})", [t], [t]), "memory", footprint(t), dense_bytes(t))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for t in tensors(out):
            self.hold(t, is_view(func))
        self.record(func, args, kwargs, out)
        return out

    def record(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any) -> None:
        base = func._schema.name.split("::")[-1]
        if is_view(func) or base in NO_KERNEL:
            return
        inputs = tensors((args, {k: v for k, v in kwargs.items() if k != "out"}))  # out= is only written
        outputs = tensors(out)
        if base in CONTIGUOUS_INPUT:
            self.contiguous_copy(inputs[0], base)
        read, written = sum(map(footprint, inputs)), sum(map(footprint, outputs))
        name = signature(op_name(func), inputs, outputs)
        if base in MATMULS:
            left, right = args[MATMULS[base]], args[MATMULS[base] + 1]
            self.add(name, "matmul", read, written, 2 * left.numel() * (right.shape[-1] if right.ndim > 1 else 1))
        elif base == "convolution":
            self.convolution(name, args, outputs[0])
        else:
            self.add(name, "memory", read, written)


    def convolution(self, name: str, args: tuple, out: torch.Tensor) -> None:
        """cuDNN's convolution: a kernel at the matmul rate (2 FLOPs per multiply-add), then, as
        ATen runs it on CUDA, the bias added in place by a kernel of its own."""
        x, weight, bias = args[:3]
        self.add(name, "matmul", footprint(x) + footprint(weight), footprint(out),
                 2 * out.numel() * (weight.numel() // weight.shape[0]))
        if bias is not None:
            self.add(signature("add_ (convolution bias)", [out, bias], [out]), "memory",
                     footprint(out) + footprint(bias), footprint(out))


def with_layout_of(q: torch.Tensor, last: int) -> torch.Tensor:
    """An empty tensor of q's shape (last dimension ``last``) laid out in memory as q is."""
    order = sorted(range(q.ndim), key=lambda d: (-q.stride(d), d))
    sizes = [*q.shape[:-1], last]
    stored = torch.empty([sizes[d] for d in order], dtype=q.dtype, device=q.device)
    return stored.permute([order.index(d) for d in range(q.ndim)])


def flash_attention(trace: KernelTrace) -> Callable[..., torch.Tensor]:
    """``F.scaled_dot_product_attention`` as one kernel: 2 * B * H * Lq * Lk * (Dqk + Dv) FLOPs (halved
    when causal), q, k, v (and a mask) read once, the output written once."""
    def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                  dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                  enable_gqa: bool = False) -> torch.Tensor:
        out = with_layout_of(query, value.shape[-1])
        flops = 2 * query.shape[:-1].numel() * key.shape[-2] * (query.shape[-1] + value.shape[-1])
        inputs = [t for t in (query, key, value, attn_mask) if t is not None]
        trace.add(signature("attention (flash)", inputs, [out]), "attention", sum(map(footprint, inputs)),
                  footprint(out), flops // 2 if is_causal else flops)
        return out
    return attention


def fused_rms_norm(trace: KernelTrace, composite: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``F.rms_norm`` as CUDA runs it: ``_fused_rms_norm`` (one kernel writing y and the float32 rstd)
    unless input and weight differ in dtype or the input is complex (then the composite ops)."""
    def rms_norm(input: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor | None = None,
                 eps: float | None = None) -> torch.Tensor:
        if input.is_complex() or (weight is not None and weight.dtype != input.dtype):
            return composite(input, normalized_shape, weight, eps)
        trace.contiguous_copy(input, "_fused_rms_norm")
        dims = len(normalized_shape)
        out = torch.empty(input.shape, dtype=input.dtype, device=input.device)
        rstd = torch.empty([*input.shape[:-dims], *[1] * dims], dtype=torch.float32, device=input.device)
        inputs = [input] if weight is None else [input, weight]
        trace.add(signature("_fused_rms_norm", inputs, [out, rstd]), "memory", sum(map(footprint, inputs)),
                  footprint(out) + footprint(rstd))
        return out
    return rms_norm


@contextlib.contextmanager
def tracing(trace: KernelTrace, fused_norms: bool = True) -> Iterator[KernelTrace]:
    """Within: no autograd, ``trace`` records, attention (and, with ``fused_norms``, RMSNorm) run as
    their CUDA kernels; without, RMSNorm runs as its composite ops (torch < 2.9 on CUDA)."""
    saved = F.scaled_dot_product_attention, F.rms_norm
    F.scaled_dot_product_attention = flash_attention(trace)
    if fused_norms:
        F.rms_norm = fused_rms_norm(trace, saved[1])
    try:
        with torch.no_grad(), trace:
            yield trace
    finally:
        F.scaled_dot_product_attention, F.rms_norm = saved


def trace(fn: Run, scopes: dict[nn.Module, str] | None = None, outside: str = "outside the blocks", *,
          fused_norms: bool = True) -> list[Kernel]:
    """The kernels of one call of ``fn``; those run inside a module of ``scopes`` carry its label."""
    return traced(fn, scopes, outside, fused_norms=fused_norms).kernels


def traced(fn: Run, scopes: dict[nn.Module, str] | None = None, outside: str = "outside the blocks", *,
           fused_norms: bool = True) -> KernelTrace:
    """``trace``'s recorder after the call: its kernels, and the peak of the bytes its ops held."""
    recorder = KernelTrace()
    recorder.scope = outside if scopes else ""
    handles = []
    for module, label in (scopes or {}).items():
        handles.append(module.register_forward_pre_hook(lambda *_, label=label: setattr(recorder, "scope", label)))
        handles.append(module.register_forward_hook(lambda *_: setattr(recorder, "scope", outside)))
    try:
        with tracing(recorder, fused_norms):
            fn()
    finally:
        for handle in handles:
            handle.remove()
    return recorder


@dataclass(frozen=True)
class Machine:
    """The time model: HBM bandwidth (bytes/s), dense matmul peak (FLOP/s), fixed cost per kernel (s)."""

    bandwidth: float
    peak: float
    launch: float

    def seconds(self, k: Kernel) -> float:
        moving = k.bytes / self.bandwidth
        return moving if k.kind == "memory" else max(moving, k.flops / self.peak)


@dataclass
class Totals:
    kernels: int = 0
    matmuls: int = 0
    attentions: int = 0
    memory_bytes: int = 0
    matmul_bytes: int = 0
    matmul_flops: int = 0
    attention_flops: int = 0
    memory_s: float = 0.0
    compute_s: float = 0.0
    launch_s: float = 0.0

    @property
    def others(self) -> int:
        return self.kernels - self.matmuls - self.attentions

    @property
    def seconds(self) -> float:
        return self.memory_s + self.compute_s + self.launch_s


def totals(kernels: Sequence[Kernel], machine: Machine, times: int = 1) -> Totals:
    """Sums over ``kernels``, each counted ``times`` (a block's kernels times the blocks of a model)."""
    t = Totals()
    for k in kernels:
        t.kernels += times
        t.launch_s += times * machine.launch
        if k.kind == "memory":
            t.memory_bytes += times * k.bytes
            t.memory_s += times * machine.seconds(k)
            continue
        t.compute_s += times * machine.seconds(k)
        if k.kind == "matmul":
            t.matmuls += times
            t.matmul_bytes += times * k.bytes
            t.matmul_flops += times * k.flops
        else:
            t.attentions += times
            t.attention_flops += times * k.flops
    return t


ROWS: tuple[tuple[str, Callable[[Totals], float], str], ...] = (
    ("kernels", lambda t: t.kernels, "{:.0f}"),
    ("  matmul kernels", lambda t: t.matmuls, "{:.0f}"),
    ("  attention kernels", lambda t: t.attentions, "{:.0f}"),
    ("  other kernels (elementwise, norm, copy)", lambda t: t.others, "{:.0f}"),
    ("other kernels: GB moved", lambda t: t.memory_bytes / 1e9, "{:.3f}"),
    ("matmuls: GB moved", lambda t: t.matmul_bytes / 1e9, "{:.3f}"),
    ("matmul TFLOP", lambda t: t.matmul_flops / 1e12, "{:.3f}"),
    ("attention TFLOP", lambda t: t.attention_flops / 1e12, "{:.3f}"),
    ("model: other kernels, GB / bandwidth (ms)", lambda t: t.memory_s * 1e3, "{:.3f}"),
    ("model: matmuls + attention at roofline (ms)", lambda t: t.compute_s * 1e3, "{:.3f}"),
    ("model: launches x overhead (ms)", lambda t: t.launch_s * 1e3, "{:.3f}"),
    ("model: lower bound (ms)", lambda t: t.seconds * 1e3, "{:.3f}"),
)


def comparison(title: str, ours: Totals, reference: Totals) -> list[str]:
    lines = [f"### {title}", "", "| | diffcore | diffusers | diffcore / diffusers |", "|---|---|---|---|"]
    for label, value, fmt in ROWS:
        a, b = value(ours), value(reference)
        ratio = f"{a / b:.3f}" if b else ("-" if not a else "inf")
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")
    return lines + [""]


def by_op(kernels: Sequence[Kernel]) -> dict[str, tuple[int, int]]:
    """op signature -> (kernels, bytes)."""
    table: dict[str, tuple[int, int]] = {}
    for k in kernels:
        n, b = table.get(k.op, (0, 0))
        table[k.op] = (n + 1, b + k.bytes)
    return table


def op_table(ours: Sequence[Kernel], reference: Sequence[Kernel]) -> list[str]:
    """Both sides' ops side by side, the largest difference in bytes first (then counts)."""
    a, b = by_op(ours), by_op(reference)
    keys = sorted(a.keys() | b.keys(), key=lambda op: (-abs(a.get(op, (0, 0))[1] - b.get(op, (0, 0))[1]),
                                                       -abs(a.get(op, (0, 0))[0] - b.get(op, (0, 0))[0]), op))
    lines = ["| op (in dtypes -> out dtypes) | diffcore n | diffcore GB | diffusers n | diffusers GB "
             "| diffcore - diffusers GB |", "|---|---|---|---|---|---|"]
    for op in keys:
        (n1, b1), (n2, b2) = a.get(op, (0, 0)), b.get(op, (0, 0))
        lines.append(f"| {op} | {n1} | {b1 / 1e9:.4f} | {n2} | {b2 / 1e9:.4f} | {(b1 - b2) / 1e9:+.4f} |")
    return lines + [""]


def kernel_list(kernels: Sequence[Kernel]) -> list[str]:
    return [f"    {i:3d} {k.kind:9s} {k.bytes / 1e6:10.2f} MB {k.flops / 1e9:10.2f} GFLOP  {k.op}"
            for i, k in enumerate(kernels)]


# -- the models ---------------------------------------------------------------------------------------------------


@dataclass
class Pair:
    """A call of diffcore's and of diffusers' same computation; ``count``: how many a whole model runs."""

    label: str
    ours: Run
    reference: Run
    count: int = 1
    scopes: tuple[dict[nn.Module, str], dict[nn.Module, str]] = field(default_factory=lambda: ({}, {}))


@dataclass
class Family:
    name: str
    inputs: str   # what one forward takes, for the report's heading
    blocks: list[Pair]
    whole: Pair


def empty(*shape: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    return torch.empty(*shape, device=META, dtype=dtype)


def tokens(tiny: bool) -> tuple[tuple[int, int], int]:
    """(latent token grid, text tokens): 1024 x 1024 pixels and 512 T5 / Qwen tokens, or a tiny run."""
    return ((8, 8), 16) if tiny else ((64, 64), 512)


def block_scopes(double: nn.ModuleList, single: nn.ModuleList) -> dict[nn.Module, str]:
    return {**{b: "double blocks" for b in double}, **{b: "single blocks" for b in single}}


def flux1(tiny: bool) -> Family:
    """FLUX.1-dev (19 double, 38 single blocks) as ``benchmarks/gpu_step.py`` builds both."""
    from diffusers import FluxTransformer2DModel

    from diffcore_flux1.model import VARIANTS, Flux, diffusers_config, params_from_diffusers_config
    from diffcore_flux1.sampling import prepare_img_ids, prepare_txt_ids

    config = diffusers_config(VARIANTS["tiny" if tiny else "dev"])
    grid, text = tokens(tiny)
    with torch.device(META):
        reference = FluxTransformer2DModel(**config).to(DTYPE).eval()
        ours = Flux(params_from_diffusers_config(config)).to(DTYPE).eval()
    p, image = ours.params, grid[0] * grid[1]
    img_ids, txt_ids = prepare_img_ids(*grid)[0].to(META, DTYPE), prepare_txt_ids(text)[0].to(META, DTYPE)
    with torch.no_grad():
        pe = ours.pe_embedder(torch.cat((txt_ids, img_ids))[None])
        rotary = reference.pos_embed(torch.cat((txt_ids, img_ids)))
    img, txt, seq, vec = empty(1, image, p.hidden_size), empty(1, text, p.hidden_size), \
        empty(1, text + image, p.hidden_size), empty(1, p.hidden_size)
    double, single = reference.transformer_blocks[0], reference.single_transformer_blocks[0]
    blocks = [
        Pair("double-stream block", lambda: ours.double_blocks[0](img, txt, pe, vec),
             lambda: double(hidden_states=img, encoder_hidden_states=txt, temb=vec, image_rotary_emb=rotary), p.depth),
        Pair("single-stream block", lambda: ours.single_blocks[0](seq, pe, vec),
             lambda: single(hidden_states=img, encoder_hidden_states=txt, temb=vec, image_rotary_emb=rotary),
             p.depth_single_blocks),
    ]
    x, ctx, y = empty(1, image, p.in_channels), empty(1, text, p.context_in_dim), empty(1, p.vec_in_dim)
    t, guidance = empty(1), empty(1)
    whole = Pair(f"whole forward ({p.depth} double + {p.depth_single_blocks} single blocks)",
                 lambda: ours(img=x, img_ids=img_ids, txt=ctx, txt_ids=txt_ids, y=y, timesteps=t, guidance=guidance),
                 lambda: reference(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t,
                                   img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False),
                 scopes=(block_scopes(ours.double_blocks, ours.single_blocks),
                         block_scopes(reference.transformer_blocks, reference.single_transformer_blocks)))
    return Family("flux1-dev" if not tiny else "flux1 tiny", f"{image} image + {text} text tokens", blocks, whole)


def flux2(variant: str) -> Callable[[bool], Family]:
    def build(tiny: bool) -> Family:
        """A FLUX.2 klein variant (klein-4b: 5 double, 20 single blocks), the shared modulations and RoPE
        tables computed outside the blocks as both forwards do."""
        from diffusers import Flux2Transformer2DModel

        from diffcore_flux2.model import VARIANTS, Flux2, batched
        from diffcore_flux2.sampling import image_ids, text_ids

        p = VARIANTS["tiny-klein" if tiny else variant]
        grid, text = tokens(tiny)
        with torch.device(META):
            reference = Flux2Transformer2DModel(
                in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
                attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
                axes_dims_rope=p.axes_dim, rope_theta=p.theta, mlp_ratio=p.mlp_ratio,
                guidance_embeds=p.guidance_embed).to(DTYPE).eval()
            ours = Flux2(p).to(DTYPE).eval()
        image, h = grid[0] * grid[1], p.hidden_size
        x_ids, ctx_ids = image_ids(*grid).to(META), text_ids(text).to(META)
        img, txt, seq, vec = empty(1, image, h), empty(1, text, h), empty(1, text + image, h), empty(1, h)
        with torch.no_grad():
            pe = ours.pe_embedder(torch.cat([batched(ctx_ids, 1), batched(x_ids, 1)], dim=1))
            mods = ours.double_stream_modulation_img(vec), ours.double_stream_modulation_txt(vec)
            single_mod = ours.single_stream_modulation(vec)[0]
            cos_sin = reference.pos_embed(ctx_ids), reference.pos_embed(x_ids)
            rotary = tuple(torch.cat([a, b], dim=0) for a, b in zip(*cos_sin))
            ref_mods = [m(vec) for m in (reference.double_stream_modulation_img,
                                         reference.double_stream_modulation_txt, reference.single_stream_modulation)]
        double, single = reference.transformer_blocks[0], reference.single_transformer_blocks[0]
        blocks = [
            Pair("double-stream block", lambda: ours.double_blocks[0](img, txt, pe, None, mods),
                 lambda: double(hidden_states=img, encoder_hidden_states=txt, temb_mod_img=ref_mods[0],
                                temb_mod_txt=ref_mods[1], image_rotary_emb=rotary), p.depth),
            Pair("single-stream block", lambda: ours.single_blocks[0](seq, pe, None, single_mod),
                 lambda: single(hidden_states=seq, encoder_hidden_states=None, temb_mod=ref_mods[2],
                                image_rotary_emb=rotary), p.depth_single_blocks),
        ]
        x, ctx, t = empty(1, image, p.in_channels), empty(1, text, p.context_in_dim), empty(1)
        guidance = empty(1) if p.guidance_embed else None
        whole = Pair(f"whole forward ({p.depth} double + {p.depth_single_blocks} single blocks)",
                     lambda: ours(x, x_ids, t, ctx, ctx_ids, guidance=guidance),
                     lambda: reference(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=x_ids,
                                       txt_ids=ctx_ids, guidance=guidance, return_dict=False),
                     scopes=(block_scopes(ours.double_blocks, ours.single_blocks),
                             block_scopes(reference.transformer_blocks, reference.single_transformer_blocks)))
        return Family(f"flux2-{variant}" if not tiny else "flux2 tiny-klein", f"{image} image + {text} text tokens",
                      blocks, whole)
    return build


def sd3(tiny: bool) -> Family:
    """SD3.5-large (38 joint blocks) at 1024 x 1024 (4096 image tokens) with 333 text tokens (77 CLIP + 256 T5),
    as ``benchmarks/gpu_step.py`` builds both."""
    from diffusers import SD3Transformer2DModel

    from diffcore_sd3.model import VARIANTS, MMDiT, diffusers_config

    params = VARIANTS["tiny" if tiny else "sd3.5-large"]
    config = diffusers_config(params)
    size, text = (16, 16) if tiny else (128, 333)
    with torch.device(META):
        reference = SD3Transformer2DModel(**config).to(DTYPE).eval()
        ours = MMDiT(params).to(DTYPE).eval()
    image, h = (size // params.patch_size) ** 2, params.hidden_size
    x, context, c = empty(1, image, h), empty(1, text, h), empty(1, h)
    block, ref_block = ours.joint_blocks[0], reference.transformer_blocks[0]
    blocks = [Pair("joint block", lambda: block(context, x, c),
                   lambda: ref_block(hidden_states=x, encoder_hidden_states=context, temb=c), params.depth - 1)]
    latents, ctx = empty(1, params.in_channels, size, size), empty(1, text, params.context_in_dim)
    y, t = empty(1, params.pooled_dim), empty(1)
    whole = Pair(f"whole forward ({params.depth} joint blocks)", lambda: ours(x=latents, timesteps=t, context=ctx, y=y),
                 lambda: reference(hidden_states=latents, encoder_hidden_states=ctx, pooled_projections=y,
                                   timestep=t, return_dict=False),
                 scopes=({b: "joint blocks" for b in ours.joint_blocks},
                         {b: "joint blocks" for b in reference.transformer_blocks}))
    return Family("sd3.5-large" if not tiny else "sd3 tiny", f"{image} image + {text} text tokens", blocks, whole)


def sdxl(tiny: bool) -> Family:
    """SDXL base at 1024 x 1024 (a 128 x 128 latent) with 77 text tokens; the block rows are the
    transformer block of the innermost level (32 x 32 tokens, 1280 wide: 60 of the UNet's 70)."""
    from diffusers import UNet2DConditionModel

    from diffcore_sdxl.model import VARIANTS, UNet, diffusers_config, label_vector

    params = VARIANTS["tiny" if tiny else "base-1.0"]
    config = diffusers_config(params)
    size = 8 if tiny else 128
    with torch.device(META):
        reference = UNet2DConditionModel(**config).to(DTYPE).eval()
        ours = UNet(params).to(DTYPE).eval()
    inner = ours.middle_block[1]
    width, tokens_inner = inner.proj_in.in_features, (size // 2 ** (len(params.channel_mult) - 1)) ** 2
    x, context = empty(1, tokens_inner, width), empty(1, 77, params.context_dim)
    block, ref_block = inner.transformer_blocks[0], reference.mid_block.attentions[0].transformer_blocks[0]
    count = sum(len(t.transformer_blocks) for t in ours.modules() if t.__class__.__name__ == "SpatialTransformer"
                and t.proj_in.in_features == width)
    blocks = [Pair(f"transformer block ({width} wide)", lambda: block(x, context, inner.attend),
                   lambda: ref_block(x, encoder_hidden_states=context), count)]
    latents, t = empty(1, params.in_channels, size, size), empty(1)
    pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    pooled, time_ids = empty(1, pooled_dim), empty(1, 6)
    with torch.no_grad():
        y = label_vector(pooled, time_ids, config["addition_time_embed_dim"])

    def scopes(down: nn.ModuleList, mid: nn.Module, up: nn.ModuleList) -> dict[nn.Module, str]:
        return {**{b: "down blocks" for b in down}, mid: "mid block", **{b: "up blocks" for b in up}}

    whole = Pair("whole forward", lambda: ours(latents, t, context, y),
                 lambda: reference(latents, t, encoder_hidden_states=context,
                                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False),
                 scopes=(scopes(ours.input_blocks, ours.middle_block, ours.output_blocks),
                         scopes(reference.down_blocks, reference.mid_block, reference.up_blocks)))
    return Family("sdxl-base" if not tiny else "sdxl tiny", f"a {size} x {size} latent, 77 text tokens", blocks, whole)


CASES: dict[str, Callable[[bool], Family]] = {"flux1-dev": flux1, "flux2-klein-4b": flux2("klein-4b"),
                                             "sd3.5-large": sd3, "sdxl-base": sdxl}


# -- the report ---------------------------------------------------------------------------------------------------


def scope_table(ours: Sequence[Kernel], reference: Sequence[Kernel], machine: Machine) -> list[str]:
    """Kernels, other-kernel GB and modelled ms of the whole forward by where they ran."""
    lines = ["| part of the forward | diffcore kernels | diffusers kernels | diffcore other GB | diffusers other GB "
             "| diffcore model ms | diffusers model ms |", "|---|---|---|---|---|---|---|"]
    for scope in dict.fromkeys([k.scope for k in ours] + [k.scope for k in reference]):
        a = totals([k for k in ours if k.scope == scope], machine)
        b = totals([k for k in reference if k.scope == scope], machine)
        lines.append(f"| {scope} | {a.kernels} | {b.kernels} | {a.memory_bytes / 1e9:.3f} | {b.memory_bytes / 1e9:.3f} "
                     f"| {a.seconds * 1e3:.2f} | {b.seconds * 1e3:.2f} |")
    return lines + [""]


def report(family: Family, machine: Machine, args: argparse.Namespace) -> list[str]:
    fused = not args.unfused_rms_norm
    lines = [f"## {family.name}: {family.inputs}, batch 1, {SHORT[DTYPE]}", ""]
    per_model: tuple[list[Totals], list[Totals]] = ([], [])
    for pair in family.blocks:
        ours, reference = trace(pair.ours, fused_norms=fused), trace(pair.reference, fused_norms=fused)
        lines += comparison(f"{family.name} {pair.label}, one block", totals(ours, machine), totals(reference, machine))
        if args.ops:
            lines += [f"{family.name} {pair.label}: ATen ops", ""] + op_table(ours, reference)
        if args.kernels:
            lines += [f"{family.name} {pair.label}, diffcore kernels in order:"] + kernel_list(ours)
            lines += [f"{family.name} {pair.label}, diffusers kernels in order:"] + kernel_list(reference) + [""]
        per_model[0].append(totals(ours, machine, pair.count))
        per_model[1].append(totals(reference, machine, pair.count))
    label = " + ".join(f"{p.count} x {p.label}" for p in family.blocks)
    lines += comparison(f"{family.name} blocks only: {label}", *(add(ts) for ts in per_model))
    return lines + whole_forward(family, machine, fused)


def add(parts: Sequence[Totals]) -> Totals:
    out = Totals()
    for part in parts:
        for name in vars(out):
            setattr(out, name, getattr(out, name) + getattr(part, name))
    return out


def whole_forward(family: Family, machine: Machine, fused_norms: bool) -> list[str]:
    pair = family.whole
    try:
        ours = traced(pair.ours, pair.scopes[0], fused_norms=fused_norms)
        reference = traced(pair.reference, pair.scopes[1], fused_norms=fused_norms)
    except Exception as e:  # noqa: BLE001 - a forward that meta cannot run: the block rows above stand
        return [f"({family.name} {pair.label} does not run on meta: {type(e).__name__}: {e}; "
                f"use the blocks-only rows)", ""]
    lines = comparison(f"{family.name} {pair.label}", totals(ours.kernels, machine),
                       totals(reference.kernels, machine))
    peak = f"| activations: peak GiB held | {ours.peak / 2 ** 30:.3f} | {reference.peak / 2 ** 30:.3f} | " \
           f"{ours.peak / reference.peak:.3f} |"
    return lines[:-1] + [peak, ""] + scope_table(ours.kernels, reference.kernels, machine)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--ops", action="store_true", help="per-op breakdown of each block, side by side")
    parser.add_argument("--kernels", action="store_true", help="also list each block's kernels in order")
    parser.add_argument("--tiny", action="store_true", help="tiny configurations and token counts (a quick check)")
    parser.add_argument("--bandwidth", type=float, default=3.35, help="HBM TB/s of the time model (H100 SXM 3.35)")
    parser.add_argument("--peak", type=float, default=989.0, help="dense bf16 matmul TFLOP/s (H100 SXM 989)")
    parser.add_argument("--launch-us", type=float, default=4.0, help="fixed cost per kernel launch, microseconds")
    parser.add_argument("--unfused-rms-norm", action="store_true",
                        help="RMSNorm as its composite ops, as CUDA runs it before torch 2.9")
    args = parser.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    machine = Machine(args.bandwidth * 1e12, args.peak * 1e12, args.launch_us * 1e-6)
    norms = "composite RMSNorm (torch < 2.9)" if args.unfused_rms_norm else "fused RMSNorm (torch >= 2.9)"
    print(f"torch {torch.__version__}; kernels counted on the meta device as eager CUDA would launch them, flash "
          f"attention, {norms}. Time model (not a measurement): {args.bandwidth} TB/s, {args.peak} TFLOP/s, "
          f"{args.launch_us} us per kernel.")
    print()
    for name in args.cases:
        print("\n".join(report(CASES[name](args.tiny), machine, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
