"""Linear layers whose fp32 inference on AMD CPUs runs through oneDNN.

Why: PyTorch sends every fp32 ``F.linear`` on CPU to MKL's sgemm. On AMD CPUs MKL takes a generic
AVX2 path even where AVX-512 is there; oneDNN (also inside every x86 PyTorch build) dispatches on
the CPU's real features and can apply the bias and a GELU inside the matmul. Measured on an AMD
EPYC (Zen 4), one thread: 10-30% less time per matmul at the shapes of a DiT, with fp32 accuracy
of the same order (a whole FLUX forward's error against float64 is 1.4x MKL's;
``benchmarks/flux_step.py``, ``tests/nn/test_linear.py``). On Intel Xeons MKL is the faster one
(oneDNN 1.05-1.5x the time of ``addmm`` at DiT, FLUX and SDXL shapes, one and two threads), so
there the path stays off.

Only inference takes this path (no autograd formula exists for the oneDNN op): anything that
needs gradients, any other dtype or device, non-AMD and non-x86 machines and builds without
oneDNN use ``F.linear``. ``DIFFCORE_ONEDNN_LINEAR=0`` makes every call use ``F.linear``
(bit-identical to code that does); ``=1`` turns the oneDNN path on whatever the CPU's vendor.
The same switch covers ``diffcore.nn.conv``. Matmuls of fewer than ``ONEDNN_MIN_ROWS`` rows (an
embedding MLP on one vector) stay on MKL: there oneDNN's fixed cost per call (~15 us) is most of it.

``linear_plus`` and ``linear_times`` take a residual sum or a gate's product into the matmul
(oneDNN binary post-ops, bit-identical to adding or multiplying after it), sparing one pass over
the output and its allocation.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffcore.nn.lora_linear import activated_linear

# activation name -> (oneDNN post-op, its algorithm)
_POST_OPS = {None: ("none", ""), "gelu_tanh": ("gelu", "tanh"), "gelu": ("gelu", "none")}


def cpu_vendor() -> str:
    """The CPU's vendor string (``AuthenticAMD``, ``GenuineIntel``) or "" where it cannot be read."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    processor = platform.processor()   # Windows: "AMD64 Family 25 Model 97 Stepping 2, AuthenticAMD"
    return processor.rsplit(",", 1)[-1].strip() if "Authentic" in processor or "Genuine" in processor else ""


def _onednn_chosen() -> bool:
    """On x86-64 AMD CPUs, where it was measured faster, unless the environment says otherwise."""
    choice = os.environ.get("DIFFCORE_ONEDNN_LINEAR", "").strip().lower()
    if choice in ("0", "false", "no", "off"):
        return False
    return ONEDNN_USABLE and (choice in ("1", "true", "yes", "on") or cpu_vendor() == "AuthenticAMD")


ONEDNN_USABLE = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
                 and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
ONEDNN = _onednn_chosen()


@contextlib.contextmanager
def reference_matmuls() -> Iterator[None]:
    """Within: every ``linear`` runs ``F.linear``, the GEMM that diffusers and plain PyTorch use, so
    a model can be compared with its reference bit for bit (the parity tests do)."""
    global ONEDNN
    saved, ONEDNN = ONEDNN, False
    try:
        yield
    finally:
        ONEDNN = saved


def _fallback(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None) -> Tensor:
    y = F.linear(x, weight, bias)
    if activation is None:
        return y
    return fresh_gelu(y, "tanh" if activation == "gelu_tanh" else "none")


def fresh_gelu(y: Tensor, approximate: str = "none") -> Tensor:
    """``F.gelu(y)`` of a tensor that only the caller holds (a fresh matmul output), overwriting it
    where autograd does not need it instead of making a second tensor its size (an MLP's hidden state is a
    block's widest, so an eager forward's peak memory is often here). Same values either way."""
    if torch.is_grad_enabled() and y.requires_grad:
        return F.gelu(y, approximate=approximate)
    return torch._C._nn.gelu_(y, approximate=approximate)


ONEDNN_MIN_ROWS = 16


def onednn_takes(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether an op on these tensors may run through oneDNN: the switch is on, fp32 on CPU,
    nothing needs gradients, and no compiler is tracing (inductor lowers oneDNN ops only for
    frozen weights)."""
    return (ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and not torch.compiler.is_compiling())


def onednn_matmul(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether ``linear(x, weight, bias)`` runs through oneDNN (so a caller may pick a oneDNN-only split)."""
    return x.dim() >= 2 and x.numel() >= ONEDNN_MIN_ROWS * x.shape[-1] and onednn_takes(x, weight, bias)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    """``activation(x @ weight.T + bias)``; ``activation`` is None, ``"gelu"`` or ``"gelu_tanh"``."""
    if activation not in _POST_OPS:
        raise ValueError(f"activation must be one of {sorted(map(str, _POST_OPS))}, got {activation!r}")
    if onednn_matmul(x, weight, bias):
        attr, algorithm = _POST_OPS[activation]
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)
    return _fallback(x, weight, bias, activation)


def _binary(x: Tensor, weight: Tensor, bias: Tensor | None, other: Tensor, op: str) -> Tensor | None:
    """``x @ weight.T + bias`` then ``op`` with ``other`` inside oneDNN's matmul, or None where
    oneDNN does not take it (``other`` must be an fp32 tensor of exactly the output's shape)."""
    if (onednn_matmul(x, weight, bias) and other.dtype == torch.float32 and not other.requires_grad
            and other.shape == (*x.shape[:-1], weight.shape[0])):
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, bias, op)
    return None


def linear_plus(layer: nn.Module, x: Tensor, other: Tensor) -> Tensor:
    """``layer(x) + other`` (a residual), the sum taken inside the matmul where ``layer`` is plain."""
    if plain(layer) and (y := _binary(x, layer.weight, layer.bias, other, "add")) is not None:
        return y
    return layer(x) + other


def linear_times(x: Tensor, weight: Tensor, bias: Tensor | None, other: Tensor) -> Tensor:
    """``(x @ weight.T + bias) * other`` (a gated unit), the product taken inside the matmul."""
    y = _binary(x, weight, bias, other, "mul")
    return F.linear(x, weight, bias) * other if y is None else y


def plain(layer: nn.Module) -> bool:
    """Whether ``layer`` is a ``Linear`` with nothing wrapped around its forward (no peft adapter,
    no accelerate offload hook, no torch hook), so calling ``linear`` on its weight directly is
    the same as calling the layer: only then may a caller fuse work into its matmul. ``Conv2d``
    (``diffcore.nn.conv``) counts too."""
    return (type(layer) in FUSABLE and "forward" not in layer.__dict__ and not layer._forward_hooks
            and not layer._forward_pre_hooks)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys, same place for peft's LoRA) with the
    oneDNN inference path of ``linear``."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


# the layer classes whose forward is exactly their fused function's (never a subclass's own)
FUSABLE: set[type[nn.Module]] = {Linear}


class GeluMLP(nn.Sequential):
    """``Linear -> GELU -> Linear`` whose keys are ``0.*`` and ``2.*`` like ``nn.Sequential``'s,
    with the GELU applied inside the first matmul when oneDNN runs it, and, under a LoRA on the
    second, the GELU's output recomputed in backward instead of kept (``diffcore.nn.lora_linear``)."""

    def __init__(self, dim: int, hidden: int, *, approximate: str = "tanh", bias: bool = True):
        super().__init__(Linear(dim, hidden, bias=bias), nn.GELU(approximate=approximate),
                         Linear(hidden, dim, bias=bias))
        self.activation = "gelu_tanh" if approximate == "tanh" else "gelu"

    def forward(self, x: Tensor) -> Tensor:
        up, act, down = self
        if not plain(down):   # an adapter on the second: it may keep the GELU's input alone
            return activated_linear(down, [(up(x), act)])
        if plain(up):
            return down(linear(x, up.weight, up.bias, self.activation))
        return down(act(up(x)))
