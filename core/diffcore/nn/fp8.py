"""fp8 weights: a network's linear (and convolution) layers stored in 8 bits, computed in the
network's dtype or in fp8.

Why: a 12B FLUX.1-dev transformer is 24 GB in bf16 and 12 GB in fp8, the difference between a 24 GB
GPU holding it or not. Two modes, as ComfyUI's ``fp8_e4m3fn`` weight dtype and its ``fp8_fast``:

- storage (``weight_dtype = "float8_e4m3fn"``): each weight is kept as fp8 with one power-of-two
  scale per output row and turned back into the input's dtype just before its matmul (a 1-byte read
  and a temporary the size of one layer's weight); the matmul itself is the usual bf16 / fp32 one.
- fp8 matmuls (``fp8_matmul = true``): the input is also quantised, per token with its own absolute
  maximum, and ``torch._scaled_mm`` multiplies fp8 by fp8 (twice the bf16 rate on Hopper and Ada
  GPUs), applying both scales and the bias in its epilogue.

Power-of-two scales multiply exactly in any dtype and keep a plain fp8 file's values unchanged:
its weights (scale 1) come back bit for bit. Layers with fewer than ``MIN_FEATURES`` inputs or
outputs (FLUX's 64-channel patch projections, the last layer) stay in full precision, where
diffusers' layerwise casting keeps them too; ``skip`` names more (the adaLN modulations, say).

The layer's state dict holds the dequantised weight under the usual keys, so saving, converting
and loading a converted network is the same as for the original one. The fp8 weight takes no
gradient: a frozen base under adapters (kohya's ``--fp8_base``) is what it is for in training,
where the input's gradient dequantises the weight again in the backward pass instead of keeping
a full-precision copy of every layer alive from the forward pass.

Rounding while loading: inside ``rounding_on_load`` (what a generate job's ``[model]`` keys open
around building the model), ``diffcore.io.checkpoint.load_model(..., denoiser=True)`` builds
the ``Float8Linear`` layers on the meta device and rounds each weight where it will live as it
is read, so the full-precision network never exists at once: a 24 GB GPU takes FLUX.1-dev in
fp8 without first holding it in bf16. The result is the same as loading, then ``store_fp8``.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import Tensor, nn


__all__ = ["FP8_DTYPES", "MIN_FEATURES", "Float8Conv2d", "Float8Linear", "Float8Weight", "convertible",
           "dequantize_rows", "quantize_rows", "quantize_tokens", "store_fp8"]

FP8_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
MIN_FEATURES = 256


def quantize_rows(weight: Tensor, dtype: torch.dtype = torch.float8_e4m3fn, *, block: int = 2048
                  ) -> tuple[Tensor, Tensor]:
    """``weight`` (out, in) -> (fp8 weight, float32 scales (out, 1)) with ``weight ~= fp8 * scale``;
    each scale the power of two that brings its row's largest magnitude within the fp8 range.
    ``block`` rows at a time, so the float32 temporaries stay small beside the widest layers."""
    top = torch.finfo(dtype).max
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    scales = torch.empty(weight.shape[0], 1, dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], block):
        rows = weight[start:start + block].detach().to(torch.float32, copy=True)   # fp8 too (no abs() on CPUs)
        amax = rows.abs().amax(dim=1, keepdim=True)
        scale = torch.exp2(torch.ceil(torch.log2(amax / top))).where(amax > 0, torch.ones_like(amax))
        out[start:start + block] = rows.div_(scale).clamp_(-top, top)
        scales[start:start + block] = scale
    return out, scales


class Float8Weight(nn.Module):
    """What ``Float8Linear`` and ``Float8Conv2d`` share: the layer's weight kept as ``weight_fp8``
    with one float32 scale per output row (channel) in ``scale`` (out, 1). ``weight`` reads as the
    dequantised weight in the original dtype (what code asking a layer for its dtype, device or
    values expects); ``bias`` is the original layer's."""

    def _store(self, weight: Tensor, dtype: torch.dtype) -> None:
        self.weight_shape, self.compute_dtype = tuple(weight.shape), weight.dtype
        if weight.is_meta:   # an empty layer for load_model to fill (assign_)
            fp8 = torch.empty(weight.shape, dtype=dtype, device="meta")
            scale = torch.empty(weight.shape[0], 1, device="meta")
        else:
            fp8, scale = _quantize(weight, dtype)
        self.weight_fp8 = nn.Parameter(fp8, requires_grad=False)
        self.register_buffer("scale", scale, persistent=False)

    @property
    def weight(self) -> Tensor:
        return self.dequantized()

    def dequantized(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight in ``dtype`` (default: the original layer's)."""
        return dequantize_rows(self.weight_fp8, self.scale, dtype or self.compute_dtype)

    @torch.no_grad()
    def assign_(self, weight: Tensor, compute_dtype: torch.dtype) -> None:
        """Take ``weight`` as this layer's, rounded on the device it lies on, computing in
        ``compute_dtype``: how ``load_model`` fills a layer that was built on the meta device."""
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"a weight of shape {tuple(weight.shape)} for a layer of {self.weight_shape}")
        fp8, scale = _quantize(weight, self.weight_fp8.dtype)
        self.weight_fp8 = nn.Parameter(fp8, requires_grad=False)
        self._buffers["scale"] = scale
        self.compute_dtype = compute_dtype

    @torch.no_grad()
    def add_(self, delta: Tensor) -> None:
        """Add ``delta`` to the weight and round again, ``round(W8 * s + delta)``: a merged LoRA, as
        ComfyUI patches its fp8 weights."""
        delta = delta.to(self.scale.device, torch.float32).reshape(self.weight_shape)
        weight, scale = _quantize(self.dequantized(torch.float32) + delta, self.weight_fp8.dtype)
        self.weight_fp8.copy_(weight)
        self.scale.copy_(scale)

    def _working_dtype(self, x: Tensor) -> torch.dtype:
        return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype

    def _training(self, x: Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad))

    def _apply(self, fn, recurse: bool = True):
        """``.to(dtype)`` / ``.half()`` change the compute dtype; the weight stays fp8, its scales float32."""
        fp8 = self.weight_fp8.dtype
        super()._apply(fn, recurse)
        if self.weight_fp8.dtype != fp8:
            self.compute_dtype = self.weight_fp8.dtype
            self.weight_fp8 = nn.Parameter(self.weight_fp8.to(fp8), requires_grad=False)
        self._buffers["scale"] = self.scale.float()
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.dequantized()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """A plain ``weight`` is quantised into ``weight_fp8`` and ``scale``."""
        key, state = prefix + "weight", dict(state_dict)
        weight = state.pop(key, None)
        if weight is None:
            missing_keys.append(key)
        elif tuple(weight.shape) != self.weight_shape:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, the "
                              f"shape in current model is {self.weight_shape}")
        else:
            weight, scale = _quantize(weight.to(self.scale.device), self.weight_fp8.dtype)
            with torch.no_grad():
                self.scale.copy_(scale)
            state[prefix + "weight_fp8"] = weight
        state.setdefault(prefix + "weight_fp8", self.weight_fp8)
        super()._load_from_state_dict(state, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class Float8Linear(Float8Weight):
    """A linear layer whose weight is fp8 with per-row scales (see the module's docstring);
    ``in_features``, ``out_features`` and ``bias`` are ``nn.Linear``'s."""

    def __init__(self, layer: nn.Linear, dtype: torch.dtype = torch.float8_e4m3fn, *, matmul: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.matmul = layer.in_features, layer.out_features, matmul
        self._store(layer.weight, dtype)
        self.bias = layer.bias

    def forward(self, x: Tensor) -> Tensor:
        if self.matmul and x.numel() >= 16 * x.shape[-1]:
            return self._scaled(x)
        if self._training(x):
            return _StoredLinear.apply(x, self.weight_fp8, self.scale, self.bias, self._working_dtype(x))
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantized(x.dtype), bias)

    def _scaled(self, x: Tensor) -> Tensor:
        """fp8 x fp8 through ``torch._scaled_mm``: the input quantised per token."""
        xq, x_scale = quantize_tokens(x.reshape(-1, x.shape[-1]), self.weight_fp8.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.scale.t(), bias=bias,
                             out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={str(self.weight_fp8.dtype).removeprefix('torch.')}, "
                f"matmul={'fp8' if self.matmul else 'upcast'}")


class Float8Conv2d(Float8Weight):
    """A 2-d convolution (zero padding) whose weight is fp8 with one scale per output channel,
    computed in the input's dtype (SDXL's ResBlocks: an eighth of its UNet's weights). Its
    geometry (``stride``, ``padding``, ``dilation``, ``groups``, the channels) is ``nn.Conv2d``'s."""

    def __init__(self, layer: nn.Conv2d, dtype: torch.dtype = torch.float8_e4m3fn):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = layer.in_channels, layer.out_channels, layer.kernel_size
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups
        self._store(layer.weight, dtype)
        self.bias = layer.bias

    def forward(self, x: Tensor) -> Tensor:
        geometry = (self.stride, self.padding, self.dilation, self.groups)
        if self._training(x):
            return _StoredConv.apply(x, self.weight_fp8, self.scale, self.bias, self._working_dtype(x), geometry)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.conv2d(x, self.dequantized(x.dtype), bias, *geometry)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}, "
                f"weight={str(self.weight_fp8.dtype).removeprefix('torch.')}")


def quantize_tokens(rows: Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[Tensor, Tensor]:
    """fp8 ``rows`` (tokens, features) and float32 scales (tokens, 1), each row's absolute maximum
    mapped to the format's largest value: ``rows ~ fp8 * scale``.

    Why this arithmetic: the maximum comes from one reduction (an infinity norm) instead of
    ``abs()`` then ``amax``, and the division reads the bf16 input itself, promoting to float32
    inside the kernel, instead of an explicit float32 copy first. Same bits as that longer form
    (the upcast is exact either way); 6 kernels and 13 bytes per element instead of 8 and 25."""
    amax = torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True).float()
    scale = amax.clamp(min=1e-12) / torch.finfo(dtype).max
    return (rows / scale).to(dtype), scale


def _quantize(weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``quantize_rows`` on the weight's output rows (channels), in its own shape."""
    fp8, scale = quantize_rows(weight.reshape(weight.shape[0], -1), dtype)
    return fp8.reshape(weight.shape), scale


def dequantize_rows(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """An fp8 weight times its per-row (per-channel) scales (out, 1), in ``dtype``."""
    return weight.to(dtype) * scale.to(dtype).reshape(-1, *[1] * (weight.ndim - 1))


class _StoredLinear(torch.autograd.Function):
    """``x W^T + b`` with ``W`` dequantised from fp8 in ``dtype``, and again in the backward pass:
    autograd keeps the 1-byte weight for the input's gradient, not a dequantised copy."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(weight, scale)
        bias = None if bias is None else bias.to(dtype)
        return nn.functional.linear(x.to(dtype), dequantize_rows(weight, scale, dtype), bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, scale = ctx.saved_tensors
        grad_x = grad @ dequantize_rows(weight, scale, grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_bias, None


class _StoredConv(torch.autograd.Function):
    """``Float8Conv2d``'s convolution with the weight dequantised again for the input's gradient,
    as ``_StoredLinear``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, dtype: torch.dtype,
                geometry: tuple) -> Tensor:
        ctx.save_for_backward(weight, scale)
        ctx.geometry, ctx.input_shape = geometry, x.shape
        bias = None if bias is None else bias.to(dtype)
        return nn.functional.conv2d(x.to(dtype), dequantize_rows(weight, scale, dtype), bias, *geometry)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            dense = dequantize_rows(weight, scale, grad.dtype)
            grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, dense, grad, *ctx.geometry)
        grad_bias = grad.sum((0, 2, 3)) if ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_bias, None, None


def store_fp8(network: nn.Module, dtype: str | torch.dtype = "float8_e4m3fn", *, matmul: bool = False,
              skip: tuple[str, ...] = (), min_features: int = MIN_FEATURES) -> list[str]:
    """Replace, in place, every ``nn.Linear`` of ``network`` (diffcore's ``Linear`` included, a peft
    adapter's base layer too) by a ``Float8Linear`` and every zero-padded ``nn.Conv2d`` by a
    ``Float8Conv2d``, except those with fewer than ``min_features`` outputs or inputs per output
    (a convolution's in-channels times its kernel) and those whose module name matches a shell
    pattern in ``skip``. Returns the names converted. Apply it before LoRAs (``diffcore.lora.apply``
    merges into or hooks onto the fp8 layers) and compiling; a layer that already has forward hooks
    is refused, as replacing it would drop them. fp8 matmuls take e4m3 weights (GPUs multiply no
    e5m2 by e5m2)."""
    fp8 = FP8_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if fp8 not in FP8_DTYPES.values():
        raise ValueError(f"weight dtype must be one of {sorted(FP8_DTYPES)}, got {dtype!r}")
    if matmul and fp8 != torch.float8_e4m3fn:
        raise ValueError(f"fp8 matmuls take float8_e4m3fn weights, not {dtype!r}")
    chosen = convertible(network, skip, min_features)
    hooked = [name for name, module in chosen if module._forward_hooks or module._forward_pre_hooks]
    if hooked:
        raise ValueError(f"{len(hooked)} layer(s) have forward hooks (an unmerged LoRA?), which replacing them by "
                         f"fp8 layers would drop: {', '.join(hooked[:5])}; store fp8 first, then add the hooks")
    for name, module in chosen:
        parent, _, child = name.rpartition(".")
        linear = isinstance(module, nn.Linear)
        stored = Float8Linear(module, fp8, matmul=matmul) if linear else Float8Conv2d(module, fp8)
        network.get_submodule(parent).register_module(child, stored)
    return [name for name, _ in chosen]


def _features(module: nn.Module) -> int:
    """The smaller of a layer's output rows and the inputs each row takes; 0: not convertible (a
    convolution padding other than with zeros, or by a string)."""
    if isinstance(module, nn.Linear):
        return min(module.in_features, module.out_features)
    if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return min(module.out_channels, module.weight[0].numel())
    return 0


def convertible(network: nn.Module, skip: tuple[str, ...], min_features: int) -> list[tuple[str, nn.Module]]:
    """The (name, layer) pairs ``store_fp8`` converts."""
    return [(name, module) for name, module in network.named_modules()
            if _features(module) >= max(min_features, 1)
            and not any(part.startswith("lora_") for part in name.split("."))   # a peft adapter's own layers
            and not any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)]
