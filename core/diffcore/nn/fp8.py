"""fp8 weights: a network's linear layers stored in 8 bits, computed in the network's dtype or in fp8.

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
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from diffcore.errors import ConfigError

__all__ = ["FP8_DTYPES", "MIN_FEATURES", "Float8Linear", "Rounding", "fp8_matmul_supported", "quantize_rows",
           "rounding_for", "rounding_on_load", "rounding_while_loading", "store_bundle_fp8", "store_fp8",
           "store_text_fp8"]

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


def fp8_matmul_supported(device: torch.device | str) -> bool:
    """Whether ``torch._scaled_mm`` runs on ``device``: CPUs, and CUDA GPUs of compute capability 8.9
    or above (Ada, Hopper, Blackwell)."""
    device = torch.device(device)
    if device.type == "cpu":
        return hasattr(torch, "_scaled_mm")
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return False


class Float8Linear(nn.Module):
    """A linear layer whose weight is fp8 with per-row scales (see the module's docstring). ``weight``
    reads as the dequantised weight in the original dtype (what code asking a layer for its dtype,
    device or values expects); ``weight_fp8`` and ``scale`` are what is stored. ``in_features``,
    ``out_features`` and ``bias`` are ``nn.Linear``'s."""

    def __init__(self, layer: nn.Linear, dtype: torch.dtype = torch.float8_e4m3fn, *, matmul: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.matmul = layer.in_features, layer.out_features, matmul
        self.compute_dtype = layer.weight.dtype
        if layer.weight.is_meta:   # an empty layer for load_model to fill (assign_)
            weight = torch.empty(layer.weight.shape, dtype=dtype, device="meta")
            scale = torch.empty(layer.out_features, 1, device="meta")
        else:
            weight, scale = quantize_rows(layer.weight, dtype)
        self.weight_fp8 = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("scale", scale, persistent=False)
        self.bias = layer.bias

    @property
    def weight(self) -> Tensor:
        return self.dequantized()

    def dequantized(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight in ``dtype`` (default: the original layer's)."""
        dtype = dtype or self.compute_dtype
        return self.weight_fp8.to(dtype) * self.scale.to(dtype)

    @torch.no_grad()
    def assign_(self, weight: Tensor, compute_dtype: torch.dtype) -> None:
        """Take ``weight`` (out, in) as this layer's, rounded on the device it lies on, computing in
        ``compute_dtype``: how ``load_model`` fills a layer that was built on the meta device."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"a weight of shape {tuple(weight.shape)} for a ({self.out_features}, "
                             f"{self.in_features}) layer")
        fp8, scale = quantize_rows(weight, self.weight_fp8.dtype)
        self.weight_fp8 = nn.Parameter(fp8, requires_grad=False)
        self._buffers["scale"] = scale
        self.compute_dtype = compute_dtype

    @torch.no_grad()
    def add_(self, delta: Tensor) -> None:
        """Add ``delta`` (out, in) to the weight and round again, ``round(W8 * s + delta)``: a merged
        LoRA, as ComfyUI patches its fp8 weights."""
        weight, scale = quantize_rows(self.dequantized(torch.float32) + delta.to(self.scale.device, torch.float32),
                                      self.weight_fp8.dtype)
        self.weight_fp8.copy_(weight)
        self.scale.copy_(scale)

    def forward(self, x: Tensor) -> Tensor:
        if self.matmul and x.numel() >= 16 * x.shape[-1]:
            return self._scaled(x)
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            autocast = torch.is_autocast_enabled(x.device.type)
            dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
            return _StoredLinear.apply(x, self.weight_fp8, self.scale, self.bias, dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantized(x.dtype), bias)

    def _scaled(self, x: Tensor) -> Tensor:
        """fp8 x fp8 through ``torch._scaled_mm``: the input quantised per token."""
        rows = x.reshape(-1, x.shape[-1])
        fp8 = self.weight_fp8.dtype
        x_scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / torch.finfo(fp8).max
        xq = (rows.float() / x_scale).to(fp8)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.scale.t(), bias=bias,
                             out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

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
        elif tuple(weight.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, the "
                              f"shape in current model is {(self.out_features, self.in_features)}")
        else:
            weight, scale = quantize_rows(weight.to(self.scale.device), self.weight_fp8.dtype)
            with torch.no_grad():
                self.scale.copy_(scale)
            state[prefix + "weight_fp8"] = weight
        state.setdefault(prefix + "weight_fp8", self.weight_fp8)
        super()._load_from_state_dict(state, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={str(self.weight_fp8.dtype).removeprefix('torch.')}, "
                f"matmul={'fp8' if self.matmul else 'upcast'}")


class _StoredLinear(torch.autograd.Function):
    """``x W^T + b`` with ``W`` dequantised from fp8 in ``dtype``, and again in the backward pass:
    autograd keeps the 1-byte weight for the input's gradient, not a dequantised copy."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(weight, scale)
        dense = weight.to(dtype) * scale.to(dtype)
        return nn.functional.linear(x.to(dtype), dense, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, scale = ctx.saved_tensors
        grad_x = grad @ (weight.to(grad.dtype) * scale.to(grad.dtype)) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_bias, None


def store_fp8(network: nn.Module, dtype: str | torch.dtype = "float8_e4m3fn", *, matmul: bool = False,
              skip: tuple[str, ...] = (), min_features: int = MIN_FEATURES) -> list[str]:
    """Replace, in place, every ``nn.Linear`` of ``network`` (diffcore's ``Linear`` included, a peft
    adapter's base layer too) by a ``Float8Linear``, except those with fewer than ``min_features``
    inputs or outputs and those whose module name matches a shell pattern in ``skip``. Returns the
    names converted. Apply it before LoRAs (``diffcore.lora.apply`` merges into or hooks onto the
    fp8 layers) and compiling; a layer that already has forward hooks is refused, as replacing it
    would drop them. fp8 matmuls take e4m3 weights (GPUs multiply no e5m2 by e5m2)."""
    fp8 = FP8_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if fp8 not in FP8_DTYPES.values():
        raise ValueError(f"weight dtype must be one of {sorted(FP8_DTYPES)}, got {dtype!r}")
    if matmul and fp8 != torch.float8_e4m3fn:
        raise ValueError(f"fp8 matmuls take float8_e4m3fn weights, not {dtype!r}")
    chosen = _chosen(network, skip, min_features)
    hooked = [name for name, module in chosen if module._forward_hooks or module._forward_pre_hooks]
    if hooked:
        raise ValueError(f"{len(hooked)} layer(s) have forward hooks (an unmerged LoRA?), which replacing them by "
                         f"fp8 layers would drop: {', '.join(hooked[:5])}; store fp8 first, then add the hooks")
    for name, module in chosen:
        parent, _, child = name.rpartition(".")
        network.get_submodule(parent).register_module(child, Float8Linear(module, fp8, matmul=matmul))
    return [name for name, _ in chosen]


def _chosen(network: nn.Module, skip: tuple[str, ...], min_features: int) -> list[tuple[str, nn.Linear]]:
    return [(name, module) for name, module in network.named_modules()
            if isinstance(module, nn.Linear) and min(module.in_features, module.out_features) >= min_features
            and not any(part.startswith("lora_") for part in name.split("."))   # a peft adapter's own layers
            and not any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)]


class Rounding(NamedTuple):
    """What ``store_fp8`` is asked for: its arguments, kept for the loader."""

    dtype: str | torch.dtype = "float8_e4m3fn"
    matmul: bool = False
    skip: tuple[str, ...] = ()
    min_features: int = MIN_FEATURES

    def apply(self, network: nn.Module) -> list[str]:
        return store_fp8(network, self.dtype, matmul=self.matmul, skip=self.skip, min_features=self.min_features)

    def trainable(self, network: nn.Module) -> list[str]:
        """The layers ``apply`` would convert whose weight requires a gradient."""
        return [name for name, m in _chosen(network, self.skip, self.min_features) if m.weight.requires_grad]


_WHILE_LOADING: ContextVar[Rounding | None] = ContextVar("diffcore_fp8_while_loading", default=None)


def rounding_while_loading() -> Rounding | None:
    """The rounding that ``load_model(..., denoiser=True)`` applies now (None: none)."""
    return _WHILE_LOADING.get()


def rounding_for(options: Any, device: torch.device | str) -> Rounding | None:
    """The ``Rounding`` that a ``[model]`` table's ``ModelOptions`` ask for (None: no fp8), its fp8
    matmuls checked against ``device`` (a ``ConfigError`` naming the key)."""
    if options is None or not options.fp8:
        return None
    if options.fp8_matmul and not fp8_matmul_supported(device):
        raise ConfigError(f"fp8_matmul = true needs torch._scaled_mm on {device}: CPUs, or CUDA GPUs of compute "
                          f"capability 8.9 or above (Ada, Hopper); use weight_dtype = \"float8_e4m3fn\" alone to "
                          f"store fp8 weights and multiply in the model's dtype", path="model.fp8_matmul")
    return Rounding(options.fp8, options.fp8_matmul, tuple(options.fp8_skip))


@contextmanager
def rounding_on_load(rounding: Rounding | None) -> Iterator[None]:
    """While active, a denoiser that ``load_model`` reads has its linear weights rounded to fp8 as
    ``rounding`` says, each as it is read (None: nothing changes)."""
    token = _WHILE_LOADING.set(rounding)
    try:
        yield
    finally:
        _WHILE_LOADING.reset(token)


def store_bundle_fp8(bundle: Any, options: Any, device: torch.device | str | None = None, *,
                     training: bool = False) -> list[str]:
    """``store_fp8`` on ``bundle.network`` as a ``[model]`` table's ``ModelOptions`` ask (the layers
    ``rounding_on_load`` rounded already stay); errors name the key: fp8 matmuls on a device without
    them, weights held elsewhere (sequential offload), a ``fp8_skip`` pattern that matches no layer,
    and, ``training``, a layer whose weight the trainer trains (fp8 weights take no gradient)."""
    device = torch.device(device) if device is not None else next(bundle.network.parameters()).device
    rounding = rounding_for(options, device)
    if any(p.is_meta for p in bundle.network.parameters()):
        key = "fp8_matmul" if options.fp8_matmul else "weight_dtype"
        raise ConfigError(f"{key} needs the network's weights in memory to round them, and they are not (offload = "
                          f"\"sequential\" keeps them in accelerate's hooks); use offload = \"model\" or \"none\"",
                          path=f"model.{key}")
    names = [name for name, _ in bundle.network.named_modules()]
    for pattern in options.fp8_skip:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ConfigError(f"fp8_skip pattern {pattern!r} matches no layer of the {type(bundle.network).__name__} "
                              f"network", path="model.fp8_skip")
    trained = rounding.trainable(bundle.network) if training else []
    if trained:
        raise ConfigError(f"weight_dtype keeps the base weights frozen in fp8, and this trainer trains {len(trained)} "
                          f"of them ({', '.join(trained[:3])}, ...): train adapters (trainer name = \"lora\", "
                          f"\"dreambooth\", \"controlnet\") or leave these layers out with fp8_skip",
                          path="model.weight_dtype")
    return rounding.apply(bundle.network)


def store_text_fp8(bundle: Any, dtype: str) -> None:
    """The bundle's text encoders (its lazy ``text`` component) with their linear weights in fp8,
    as ComfyUI's ``t5xxl_fp8_e4m3fn`` (T5-XXL's 9.5 GB in bf16 become 4.8): at once when they are
    loaded, else as their loader returns them. A model without text encoders is a ``ConfigError``."""
    if bundle.loaded("text"):
        store_fp8(bundle.text, dtype)
    elif "text" in bundle.loaders:
        load = bundle.loaders["text"]

        def rounded() -> nn.Module:
            encoders = load()
            store_fp8(encoders, dtype)
            return encoders
        bundle.loaders["text"] = rounded
    else:
        raise ConfigError(f"text_weight_dtype = {dtype!r} stores text encoders in fp8, and this model "
                          f"({type(bundle).__name__}) has none", path="model.text_weight_dtype")
