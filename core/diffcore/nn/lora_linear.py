"""peft's LoRA ``Linear`` as one autograd function in training: fewer passes over wide tensors,
and an activation feeding the layer kept once instead of twice.

peft computes ``base(x) + lora_B(lora_A(x)) * scaling`` as separate modules, so each step makes,
scales and adds an output-wide tensor in the forward pass, scales an output-wide gradient in the
backward pass, and adds two input-wide gradients. ``_LoRALinear`` adds the adapter into the base
output inside one GEMM (``addmm_``, alpha = scaling) and scales only rank-wide tensors; in a
FLUX.1 LoRA step those elementwise passes over 3584-wide tensors were a tenth of the time.

Second, when the input is an activation's output (an MLP's ``down(gelu(up(x)))``, a single-stream
block's ``linear2(cat(attn, gelu(mlp)))``), autograd keeps the activation's input (for its own
gradient) and its output (for ``A``'s): twice the MLP width per token. ``activated_linear`` keeps
the input alone and runs the cheap elementwise activation again in backward (a fifth less
activation memory in that step, ``benchmarks/lora_step.py``).

Results equal peft's to rounding (``tests/nn/test_lora_linear.py``). Used only where it is the
same computation: one active vanilla adapter (no DoRA or other variant, no dropout, no lora
bias), unmerged, a frozen base ``nn.Linear`` (or ``Float8Linear``: an fp8 base, dequantised in
the forward and again in the backward pass), one dtype, no autocast, and gradients being
recorded; anything else runs peft's own forward. A block under gradient checkpointing keeps its
activations (``keeping_activations``): it is recomputed whole already.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffcore.nn.fp8 import Float8Linear, dequantize_rows

__all__ = ["Activation", "activated_linear", "fuse_lora_layers", "keeping_activations"]

# an activation applied to one part of the layer's input; None: the part as it is
Activation = Callable[[Tensor], Tensor] | None

_recomputing = ContextVar("diffcore_lora_recompute", default=True)


@contextmanager
def keeping_activations() -> Iterator[None]:
    """Inside this block ``activated_linear`` keeps its activations' outputs (autograd as usual)."""
    token = _recomputing.set(False)
    try:
        yield
    finally:
        _recomputing.reset(token)


def activated_linear(layer: nn.Module, parts: Sequence[tuple[Tensor, Activation]]) -> Tensor:
    """``layer(cat([act(part) for part, act in parts], dim=-1))``, for a peft LoRA ``layer`` with
    the activations' outputs recomputed in the backward pass instead of kept."""
    adapter = _vanilla_adapter(layer, [part for part, _ in parts])
    if adapter is None or not _recomputing.get():
        x = _activated([part for part, _ in parts], [act for _, act in parts])
        return layer(x) if adapter is None else _LoRALinear.apply((None,), *adapter, x)
    return _LoRALinear.apply(tuple(act for _, act in parts), *adapter, *(part for part, _ in parts))


def fuse_lora_layers(module: nn.Module) -> int:
    """Make every peft LoRA ``Linear`` in ``module`` run as ``_LoRALinear`` when it can (peft's
    forward otherwise); returns how many. Bound methods: a deep copy of the module rebinds them
    to the copy's layers. Adapters, keys and peft's merge / unload are untouched."""
    count = 0
    for layer in module.modules():
        if hasattr(layer, "lora_A") and hasattr(layer, "base_layer") and type(layer).__name__ == "Linear":
            layer.forward = types.MethodType(_fused_forward, layer)
            count += 1
    return count


def _fused_forward(layer: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    adapter = None if args or kwargs else _vanilla_adapter(layer, [x])
    if adapter is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    return _LoRALinear.apply((None,), *adapter, x)


def _vanilla_adapter(layer: nn.Module, parts: Sequence[Tensor]
                     ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor, Tensor, float] | None:
    """(base weight, its fp8 row scales or None, base bias, A, B, scaling) when ``layer`` is a
    peft LoRA Linear that ``_LoRALinear`` computes as peft would; the base an ``nn.Linear`` or
    a ``Float8Linear`` storing its weight in fp8 (an fp8 base in training)."""
    if not torch.is_grad_enabled() or not hasattr(layer, "lora_A") or not hasattr(layer, "base_layer"):
        return None
    base = layer.base_layer
    fp8 = type(base) is Float8Linear and not base.matmul
    if (type(layer).__name__ != "Linear" or layer.disable_adapters or layer.merged or getattr(layer, "lora_variant", {})
            or not (isinstance(base, nn.Linear) or fp8) or base._forward_hooks or base._forward_pre_hooks
            or "forward" in base.__dict__ or (not fp8 and base.weight.requires_grad)
            or (base.bias is not None and base.bias.requires_grad)):
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    lora_a, lora_b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if not isinstance(dropout, nn.Identity) or lora_a.bias is not None or lora_b.bias is not None:
        return None
    dtype = base.compute_dtype if fp8 else base.weight.dtype
    if (any(t.dtype != dtype for t in (lora_a.weight, lora_b.weight, *parts))
            or torch.is_autocast_enabled(lora_a.weight.device.type)):
        return None
    if not any(t.requires_grad for t in (lora_a.weight, lora_b.weight, *parts)):
        return None
    weight, scale = (base.weight_fp8, base.scale) if fp8 else (base.weight, None)
    return weight, scale, base.bias, lora_a.weight, lora_b.weight, layer.scaling[name]


def _dense(weight: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The base weight to multiply by: itself, or an fp8 one dequantised (again in backward, so
    autograd keeps the 1-byte weight, not a copy)."""
    return weight if scale is None else dequantize_rows(weight, scale, dtype)


class _LoRALinear(torch.autograd.Function):
    """y = W x + b + s B A x with x = cat(act(part)); saves the parts and A x (rank wide)."""

    @staticmethod
    def forward(ctx, acts, weight, scale, bias, lora_a, lora_b, scaling, *parts):
        with torch.no_grad():
            x = _activated(parts, acts)
            down = F.linear(x, lora_a)
            y = F.linear(x, _dense(weight, scale, x.dtype), bias)
            y.view(-1, y.shape[-1]).addmm_(down.reshape(-1, down.shape[-1]), lora_b.t(), alpha=scaling)
        ctx.acts, ctx.scaling = acts, scaling
        ctx.save_for_backward(weight, scale, lora_a, lora_b, down, *parts)
        return y

    @staticmethod
    def backward(ctx, grad):
        weight, scale, lora_a, lora_b, down, *parts = ctx.saved_tensors
        needs_a, needs_b, needs_parts = ctx.needs_input_grad[4], ctx.needs_input_grad[5], ctx.needs_input_grad[7:]
        flat_grad = grad.reshape(-1, grad.shape[-1])
        d_lora_b = flat_grad.t().mm(down.reshape(-1, down.shape[-1])).mul_(ctx.scaling) if needs_b else None
        d_down = flat_grad.mm(lora_b).mul_(ctx.scaling)   # rank wide: scaled here, not the output-wide grad
        # each part's activation again (a small graph where its gradient is wanted); no cat: A's
        # gradient and the input gradient are taken part by part, on column blocks
        inputs, xs = [], []
        for part, act, need in zip(parts, ctx.acts, needs_parts):
            with torch.enable_grad() if act is not None and need else torch.no_grad():
                inp = part.detach().requires_grad_(act is not None and need)
                inputs.append(inp)
                xs.append(inp if act is None else act(inp))
        flat_xs = [x.detach().reshape(-1, x.shape[-1]) for x in xs]
        d_lora_a = None
        if needs_a:
            d_lora_a = torch.cat([d_down.t().mm(x) for x in flat_xs], dim=1) if len(xs) > 1 else d_down.t().mm(flat_xs[0])
        d_parts: list[Tensor | None] = [None] * len(parts)
        if any(needs_parts):
            d_x = flat_grad.mm(_dense(weight, scale, grad.dtype)).addmm_(d_down, lora_a)
            start = 0
            for i, (x, act, need) in enumerate(zip(xs, ctx.acts, needs_parts)):
                width = x.shape[-1]
                if need:
                    g = d_x[:, start:start + width] if len(xs) > 1 else d_x
                    g = g.reshape(x.shape)
                    d_parts[i] = g if act is None else torch.autograd.grad(x, inputs[i], g)[0]
                start += width
        return (None, None, None, None, d_lora_a, d_lora_b, None, *d_parts)


def _activated(parts: Sequence[Tensor], acts: Sequence[Activation]) -> Tensor:
    xs = [part if act is None else act(part) for part, act in zip(parts, acts)]
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim=-1)
