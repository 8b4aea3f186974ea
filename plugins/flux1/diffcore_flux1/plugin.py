"""diffcore plugin: the ``flux1`` model family. Imports no torch; ``build_flux1`` does, when called.

Weights load from local files only: a diffusers FLUX.1 folder (``model_index.json`` with
``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``text_encoder_2/``,
``tokenizer_2/``), or a single transformer file (BFL ``flux1-dev.safetensors``, ComfyUI, or
diffusers keys) with ``vae`` (``ae.safetensors``) and ``text_encoders`` (a diffusers folder) set.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs

from diffcore.errors import ConfigError, did_you_mean
from diffcore.hookspecs import hookimpl
from diffcore_flux1.params import VARIANTS

DTYPES = ("bfloat16", "float16", "float32")
TEXT_TO_IMAGE = ("dev", "schnell", "kontext-dev", "tiny")  # the rest need image inputs the bundle does not take yet
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _variant(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value not in VARIANTS:
        raise ConfigError(f"unknown FLUX.1 variant {value!r}{did_you_mean(value, VARIANTS)}; "
                          f"known: {', '.join(VARIANTS)}", path=attribute.name)
    if value not in TEXT_TO_IMAGE:
        raise ConfigError(f"variant {value!r} needs image conditioning (mask / control image), which the flux1 "
                          f"bundle does not take yet; text-to-image variants: {', '.join(TEXT_TO_IMAGE)}",
                          path=attribute.name)


def _dtype(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {value!r}", path=attribute.name)


def _local(instance: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if not value or Path(value).expanduser().exists():
        return  # an empty path is reported when the model is built
    if HUB_ID.fullmatch(value) and not value.startswith((".", "/", "~")):
        raise ConfigError(f"{value!r} looks like a Hugging Face hub id; diffcore never downloads. Fetch it first "
                          f"(huggingface-cli download {value} --local-dir ./{value.split('/')[-1]}) and set "
                          f"{attribute.name} to that local folder (the one holding model_index.json)",
                          path=attribute.name)
    raise ConfigError(f"no such file or folder: {value}", path=attribute.name)


@attrs.frozen
class Flux1Config:
    """``path``: diffusers folder or transformer file; ``vae`` / ``text_encoders`` override or
    complete it; ``guidance``: the embedded guidance (dev default 3.5; schnell ignores it)."""

    variant: str = attrs.field(default="dev", validator=_variant)
    path: str = attrs.field(default="", validator=_local)
    vae: str | None = attrs.field(default=None, validator=_local)
    text_encoders: str | None = attrs.field(default=None, validator=_local)
    dtype: str = attrs.field(default="bfloat16", validator=_dtype)
    guidance: float = 3.5
    max_sequence_length: int | None = attrs.field(default=None)  # T5 tokens: 512, schnell 256


def build_flux1(config: Flux1Config, device: Any = "cpu") -> Any:
    """A ``FluxBundle`` on ``device`` from the local files ``config`` names."""
    import torch

    from diffcore_flux1.bundle import FluxBundle
    from diffcore_flux1.load import load_transformer, load_vae
    from diffcore_flux1.text import FluxTextEncoder

    if not config.path:
        raise ConfigError("set path to a local FLUX.1 diffusers folder or transformer .safetensors file", path="path")
    dtype = getattr(torch, config.dtype)
    root = Path(config.path).expanduser()
    folder = root if root.is_dir() and (root / "transformer").is_dir() else None
    network = load_transformer(root, variant=config.variant, dtype=dtype, device=device)

    vae_path = config.vae or (folder / "vae" if folder and (folder / "vae").is_dir() else None)
    if vae_path is None:
        raise ConfigError(f"{root} has no vae/ folder: set vae to FLUX.1's ae.safetensors", path="vae")
    vae = load_vae(vae_path, variant="tiny" if config.variant == "tiny" else "flux1", dtype=dtype, device=device)

    text_path = config.text_encoders or (folder if folder and (folder / "text_encoder").is_dir() else None)
    if text_path is None:
        raise ConfigError(f"{root} has no text encoders: set text_encoders to a local diffusers FLUX.1 folder "
                          f"(text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/)", path="text_encoders")
    schnell = config.variant == "schnell"
    text = FluxTextEncoder.from_folder(text_path, max_length=config.max_sequence_length or (256 if schnell else 512),
                                       dtype=dtype, device=device)
    return FluxBundle(network=network, vae=vae, text=text, guidance=config.guidance,
                      default_steps=4 if schnell else 28,
                      default_schedule={"name": "flow"} if schnell else {"name": "flux"})


@hookimpl
def register_models(register):
    register("flux1", build_flux1, config=Flux1Config,
             description="FLUX.1 dev / schnell / Kontext (Black Forest Labs): rectified-flow MMDiT, T5 + CLIP")
