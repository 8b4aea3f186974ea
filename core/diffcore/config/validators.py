"""attrs field validators every model family's config needs, with the project's error style (a
``ConfigError`` naming the key and what was expected, with a did-you-mean).

Torch-free: a plugin module validates job files without importing torch. ``resolve_dtype``
imports it when called.

    variant: str = attrs.field(default="auto", validator=variant_of("FLUX.1", VARIANTS))
    path: str = attrs.field(default="", validator=local_path)
    dtype: str = attrs.field(default="auto", validator=one_of(DTYPES))
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import attrs

from diffcore.errors import ConfigError, did_you_mean

__all__ = ["CHECK_PATHS", "DTYPES", "local_path", "paths_unchecked", "one_of", "renamed_field", "resolve_dtype",
           "variant_of"]

DTYPES = ("auto", "bfloat16", "float16", "float32")  # auto: bfloat16 on CUDA, float32 elsewhere
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def one_of(choices: Iterable[str]) -> Validator:
    """The value is one of ``choices`` (``dtype must be one of auto, bfloat16, ..., got 'x'``)."""
    choices = tuple(choices)

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value not in choices:
            raise ConfigError(f"{attribute.name} must be one of {', '.join(choices)}, got {value!r}"
                              f"{did_you_mean(str(value), choices)}", path=attribute.name)

    return check


def variant_of(family: str, variants: Iterable[str], *, auto: bool = True) -> Validator:
    """The value names a row of ``variants`` (or is ``"auto"``, read from the weights, when
    ``auto``): ``unknown FLUX.1 variant 'shnell' (did you mean "schnell"?); known: auto, dev, ...``."""
    names = tuple(variants)
    known = ("auto", *names) if auto else names

    def check(instance: Any, attribute: attrs.Attribute, value: str) -> None:
        if value not in known:
            raise ConfigError(f"unknown {family} variant {value!r}{did_you_mean(value, names)}; "
                              f"known: {', '.join(known)}", path=attribute.name)

    return check


#: False inside ``paths_unchecked()``: a job written on one machine for another (a laptop for a
#: cluster, the shipped real-size examples) is checked for everything but its local files.
CHECK_PATHS: ContextVar[bool] = ContextVar("CHECK_PATHS", default=True)


@contextmanager
def paths_unchecked() -> Iterator[None]:
    token = CHECK_PATHS.set(False)
    try:
        yield
    finally:
        CHECK_PATHS.reset(token)


def local_path(instance: Any, attribute: attrs.Attribute, value: str | None) -> None:
    """A file or folder that exists. diffcore never downloads: a Hugging Face hub id is refused
    with the command that fetches it. Empty or unset passes (the factory says what is missing)."""
    if not value or Path(value).expanduser().exists():
        return
    if not CHECK_PATHS.get() and not (HUB_ID.fullmatch(value) and not value.startswith((".", "/", "~"))):
        return
    if HUB_ID.fullmatch(value) and not value.startswith((".", "/", "~")):
        raise ConfigError(f"{value!r} looks like a Hugging Face hub id; diffcore never downloads. Fetch it first "
                          f"(huggingface-cli download {value} --local-dir ./{value.split('/')[-1]}) and set "
                          f"{attribute.name} to that local folder (the one holding model_index.json)",
                          path=attribute.name)
    raise ConfigError(f"no such file or folder: {value} (diffcore reads local files only)", path=attribute.name)


def resolve_dtype(name: str, device: Any = "cpu") -> Any:
    """A ``DTYPES`` name -> ``torch.dtype``; ``"auto"`` is bfloat16 on CUDA, float32 elsewhere
    (CPU bf16 matmuls are slow, and MPS lacks some bf16 kernels)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}", path="dtype")
    return getattr(torch, name)


def renamed_field(instance: Any, old: str, new: str) -> None:
    """For ``__attrs_post_init__`` of a frozen config: a value under the deprecated name ``old`` moves
    to ``new`` with a ``FutureWarning``; both set to different values is an error."""
    value = getattr(instance, old)
    if value is None:
        return
    current = getattr(instance, new)
    if current is not None and current != value:
        raise ConfigError(f"{old} is the old name of {new}; set only {new}", path=old)
    warnings.warn(f"{type(instance).__name__}: {old!r} is deprecated, call it {new!r}", FutureWarning, stacklevel=4)
    object.__setattr__(instance, new, value)
    object.__setattr__(instance, old, None)
