"""2-d convolutions whose fp32 inference on CPU runs through oneDNN at every input size.

Why: PyTorch sends a batch-1 3x3 convolution of fewer than 20480 input values (a 256-channel
8 x 8 map: the deepest level of a small UNet) to its im2col + GEMM kernel instead of oneDNN; on
the AMD EPYC where this was measured that kernel took 2.6x oneDNN's time at that shape
(``benchmarks/sdxl_step.py``). ``conv_plus`` adds a ResBlock's residual or time embedding in
place into the convolution's output, sparing an allocation (oneDNN's fused sum would need
channels-last tensors, which PyTorch requires for it and SDXL's NCHW activations are not).

The switch is ``diffcore.nn.linear``'s (``DIFFCORE_ONEDNN_LINEAR``, on by default on AMD CPUs;
``reference_matmuls()`` turns it off for bit-exact parity tests). Anything that needs gradients,
other dtypes or devices, non-zero padding modes and wrapped or hooked layers use ``F.conv2d``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from diffcore.nn import linear as switch


def _onednn_conv(layer: nn.Conv2d, x: Tensor) -> bool:
    return (x.dim() == 4 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
            and switch.onednn_takes(x, layer.weight, layer.bias))


def _arguments(layer: nn.Conv2d) -> tuple:
    return (list(layer.padding), list(layer.stride), list(layer.dilation), layer.groups)


def conv_plus(layer: nn.Module, x: Tensor, other: Tensor) -> Tensor:
    """``layer(x) + other`` (a residual, a per-channel embedding), summed in place into the
    convolution's fresh output where ``layer`` is a plain ``Conv2d`` on the oneDNN path."""
    if switch.plain(layer) and _onednn_conv(layer, x):
        y = layer.onednn(x)
        if other.dtype == y.dtype and not other.requires_grad and torch.broadcast_shapes(other.shape, y.shape) == y.shape:
            return y.add_(other)
        return y + other
    return layer(x) + other


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and keys, same place for peft's LoRA) with the oneDNN
    inference path, which keeps its weight in oneDNN's blocked layout between calls."""

    def forward(self, x: Tensor) -> Tensor:
        if _onednn_conv(self, x):
            return self.onednn(x)
        return super().forward(x)

    def onednn(self, x: Tensor) -> Tensor:
        if not (CACHE and switch.plain(self)):   # an offload hook moves the weight in per call: no copy kept
            return torch.mkldnn_convolution(x, self.weight, self.bias, *_arguments(self))
        return torch.ops.mkldnn._convolution_pointwise(x, self._blocked_weight(x), self.bias, *_arguments(self),
                                                        "none", [], "")

    def _blocked_weight(self, x: Tensor) -> Tensor:
        """The weight reordered once, again whenever it changes: a new tensor or an in-place write
        (``_version``), or a write through ``.data`` that skips the version, as peft's merge does
        (a strided sample of the values, compared each call)."""
        w = self.weight.detach()
        version = -1 if w.is_inference() else w._version   # inference tensors keep no version: the sample does
        key, sample = (w.data_ptr(), version, w.dtype), w.reshape(-1)[:: max(1, w.numel() // 64)]
        cached = self.__dict__.get("_blocked")
        if cached is None or cached[0] != key or not torch.equal(cached[1], sample):
            blocked = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), *_arguments(self), list(x.shape))
            self.__dict__["_blocked"] = cached = (key, sample.clone(), blocked)
        return cached[2]

    def _apply(self, fn, recurse: bool = True):   # .to() / .half(): the copy would be stale and pinned
        self.__dict__.pop("_blocked", None)
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:   # deep copies and pickles leave the oneDNN tensor behind
        state = super().__getstate__()
        state.pop("_blocked", None)
        return state


CACHE = (os.environ.get("DIFFCORE_ONEDNN_CONV_CACHE", "").strip().lower() not in ("0", "false", "no", "off")
         and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight") and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))
switch.FUSABLE.add(Conv2d)
