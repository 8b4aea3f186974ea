"""A job's fp8 keys applied to a bundle (``diffcore.nn.fp8`` holds the layers): ``[model]``'s
``weight_dtype`` / ``fp8_matmul`` / ``fp8_skip`` on the denoiser, rounded while its checkpoint is
read (``rounding_on_load`` around the family's build, read by ``load_model(..., denoiser=True)``)
or after the build; ``text_weight_dtype`` on the text encoders, as they are read
(``text_rounding_on_load`` around their loader, read by ``diffcore.io.pretrained.load_pretrained``)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

import torch
from torch import nn

from diffcore.errors import ConfigError
from diffcore.nn.fp8 import MIN_FEATURES, convertible, store_fp8

__all__ = ["Rounding", "fp8_matmul_supported", "rounding_for", "rounding_on_load", "rounding_while_loading",
           "store_bundle_fp8", "store_text_fp8", "text_rounding_on_load", "text_rounding_while_loading"]


def fp8_matmul_supported(device: torch.device | str) -> bool:
    """Whether ``torch._scaled_mm`` runs on ``device``: CPUs, and CUDA GPUs of compute capability 8.9
    or above (Ada, Hopper, Blackwell)."""
    device = torch.device(device)
    if device.type == "cpu":
        return hasattr(torch, "_scaled_mm")
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return False


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
        return [name for name, m in convertible(network, self.skip, self.min_features) if m.weight.requires_grad]


_WHILE_LOADING: ContextVar[Rounding | None] = ContextVar("diffcore_fp8_while_loading", default=None)
_TEXT_WHILE_LOADING: ContextVar[Rounding | None] = ContextVar("diffcore_text_fp8_while_loading", default=None)


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


def text_rounding_while_loading() -> Rounding | None:
    """The rounding that ``load_pretrained`` applies to the text encoders it reads now (None: none)."""
    return _TEXT_WHILE_LOADING.get()


@contextmanager
def _setting(var: ContextVar, rounding: Rounding | None) -> Iterator[None]:
    token = var.set(rounding)
    try:
        yield
    finally:
        var.reset(token)


def rounding_on_load(rounding: Rounding | None) -> AbstractContextManager[None]:
    """While active, a denoiser that ``load_model`` reads has its linear and convolution weights
    rounded to fp8 as ``rounding`` says, each as it is read (None: nothing changes)."""
    return _setting(_WHILE_LOADING, rounding)


def text_rounding_on_load(rounding: Rounding | None) -> AbstractContextManager[None]:
    """While active, the text encoders that ``diffcore.io.pretrained.load_pretrained`` reads have
    their linear weights rounded as each is read (None: nothing changes)."""
    return _setting(_TEXT_WHILE_LOADING, rounding)


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
    loaded, else as their loader reads them (each weight rounded as it is read, where the loader
    goes through ``load_pretrained``; after loading otherwise). A model without text encoders is
    a ``ConfigError``."""
    if bundle.loaded("text"):
        store_fp8(bundle.text, dtype)
    elif "text" in bundle.loaders:
        load = bundle.loaders["text"]

        def rounded() -> nn.Module:
            with text_rounding_on_load(Rounding(dtype)):
                encoders = load()
            store_fp8(encoders, dtype)   # what was read otherwise (rounded layers stay as they are)
            return encoders
        bundle.loaders["text"] = rounded
    else:
        raise ConfigError(f"text_weight_dtype = {dtype!r} stores text encoders in fp8, and this model "
                          f"({type(bundle).__name__}) has none", path="model.text_weight_dtype")
