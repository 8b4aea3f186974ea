"""A LoRA linear layer fed by activations, which keeps the activations' inputs instead of their
outputs for the backward pass.

Why: in a LoRA step the base weights are frozen, so the base matmul saves nothing of its input;
only the adapter's ``A`` needs that input for its gradient. When the input is an activation's
output (an MLP's ``down(gelu(up(x)))``, a single-stream block's ``linear2(cat(attn, gelu(mlp)))``)
autograd keeps both the activation's input (for the activation's own gradient) and its output
(for ``A``'s): twice the MLP width per token. ``activated_linear`` keeps the input alone and runs
the cheap elementwise activation again in the backward pass. In the FLUX.1 LoRA benchmark this
is a fifth of what a step saves for backward (``benchmarks/lora_step.py``); results are the same
as peft's to the last bit in the forward pass (the same operations in the same order) and to
rounding in the gradients (``tests/nn/test_recompute.py``).

Used only where it is the same computation as peft's ``Linear``: one active vanilla adapter
(no DoRA or other variant, no dropout, no lora bias), unmerged, a frozen base ``nn.Linear``, one
dtype, and gradients being recorded. Anything else runs the plain ``layer(cat(act(part)))``, as
does a block under gradient checkpointing (``plainly``): it is recomputed whole already, and the
second recomputation would cost time for no memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn

# an activation applied to one part of the layer's input; None: the part as it is
Activation = Callable[[Tensor], Tensor] | None

_recomputing = ContextVar("diffcore_activated_linear", default=True)


@contextmanager
def plainly() -> Iterator[None]:
    """Run ``activated_linear`` as the plain composition inside this block."""
    token = _recomputing.set(False)
    try:
        yield
    finally:
        _recomputing.reset(token)


def activated_linear(layer: nn.Module, parts: Sequence[tuple[Tensor, Activation]]) -> Tensor:
    """``layer(cat([act(part) for part, act in parts], dim=-1))``, for a peft LoRA ``layer`` with
    the activations' outputs recomputed in the backward pass instead of kept."""
    adapter = _vanilla_adapter(layer, [part for part, _ in parts])
    if adapter is None:
        xs = [part if act is None else act(part) for part, act in parts]
        return layer(xs[0] if len(xs) == 1 else torch.cat(xs, dim=-1))
    base, lora_a, lora_b, scaling = adapter
    acts = tuple(act for _, act in parts)
    return _ActivatedLoRA.apply(acts, scaling, base.weight, base.bias, lora_a, lora_b, *(p for p, _ in parts))


def _vanilla_adapter(layer: nn.Module, parts: Sequence[Tensor]) -> tuple[nn.Linear, Tensor, Tensor, float] | None:
    """(base layer, A, B, scaling) when ``layer`` is a peft LoRA Linear this module computes exactly."""
    if not torch.is_grad_enabled() or not _recomputing.get() or not hasattr(layer, "lora_A") or not hasattr(layer, "base_layer"):
        return None
    base = layer.base_layer
    if (type(layer).__name__ != "Linear" or layer.disable_adapters or layer.merged or getattr(layer, "lora_variant", {})
            or not isinstance(base, nn.Linear) or base._forward_hooks or base._forward_pre_hooks
            or "forward" in base.__dict__ or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)):
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    lora_a, lora_b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if not isinstance(dropout, nn.Identity) or lora_a.bias is not None or lora_b.bias is not None:
        return None
    dtype = base.weight.dtype
    if (any(t.dtype != dtype for t in (lora_a.weight, lora_b.weight, *parts))
            or torch.is_autocast_enabled(base.weight.device.type)):
        return None
    if not any(t.requires_grad for t in (lora_a.weight, lora_b.weight, *parts)):
        return None
    return base, lora_a.weight, lora_b.weight, layer.scaling[name]


class _ActivatedLoRA(torch.autograd.Function):
    """y = W x + b + s B A x with x = cat(act(part)); saves the parts and A x (rank wide)."""

    @staticmethod
    def forward(ctx, acts, scaling, weight, bias, lora_a, lora_b, *parts):
        with torch.no_grad():
            x = _activated(parts, acts)
            down = torch.nn.functional.linear(x, lora_a)
            # peft's order: base, then + lora_B(lora_A(x)) * scaling
            y = torch.nn.functional.linear(x, weight, bias) + torch.nn.functional.linear(down, lora_b) * scaling
        ctx.acts, ctx.scaling = acts, scaling
        ctx.save_for_backward(weight, lora_a, lora_b, down, *parts)
        return y

    @staticmethod
    def backward(ctx, grad):
        weight, lora_a, lora_b, down, *parts = ctx.saved_tensors
        grad_b = grad * ctx.scaling   # the gradient reaching lora_B's output, as autograd forms it
        flat_b, flat_down = grad_b.reshape(-1, grad_b.shape[-1]), down.reshape(-1, down.shape[-1])
        d_lora_b = flat_b.t().mm(flat_down) if ctx.needs_input_grad[5] else None
        d_down = grad_b.matmul(lora_b)
        needs_parts = ctx.needs_input_grad[6:]
        with torch.enable_grad():   # the activations again, as a small graph to differentiate
            inputs = [p.detach().requires_grad_(need) for p, need in zip(parts, needs_parts)]
            x = _activated(inputs, ctx.acts)
        d_lora_a = None
        if ctx.needs_input_grad[4]:
            d_lora_a = d_down.reshape(-1, d_down.shape[-1]).t().mm(x.detach().reshape(-1, x.shape[-1]))
        d_parts: list[Tensor | None] = [None] * len(parts)
        if any(needs_parts):
            d_x = grad.matmul(weight) + d_down.matmul(lora_a)
            wanted = [i for i, need in enumerate(needs_parts) if need]
            grads = torch.autograd.grad(x, [inputs[i] for i in wanted], d_x)
            for i, g in zip(wanted, grads):
                d_parts[i] = g
        return (None, None, None, None, d_lora_a, d_lora_b, *d_parts)


def _activated(parts: Sequence[Tensor], acts: Sequence[Activation]) -> Tensor:
    xs = [part if act is None else act(part) for part, act in zip(parts, acts)]
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim=-1)
