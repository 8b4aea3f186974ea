"""The key patterns of each LoRA format, as small tables (no torch here).

A key parses into (module name, role, naming): role ``down`` (A), ``up`` (B) or ``alpha``;
naming ``ours`` (the network's own module names: BFL's for FLUX), ``diffusers`` (diffusers'
model), and either with dots written as ``_`` (kohya's). ``not_applicable`` keys belong to
other parts of a pipeline (text encoders).

| format    | key                                                        | alpha            |
|-----------|------------------------------------------------------------|------------------|
| diffusers | ``transformer.<diffusers module>.lora_A.weight`` / ``lora_B`` (``unet.`` for SDXL) | ``.alpha`` or none |
| kohya     | ``lora_unet_<our module, _>.lora_down.weight`` / ``lora_up`` | ``.alpha``       |
| comfyui   | ``diffusion_model.<our module>.lora_A.weight`` / ``lora_B`` or ``lora_down`` / ``lora_up`` | ``.alpha`` |
| diffcore  | ``<our module>.lora_A.weight`` / ``lora_B`` (BFL names for FLUX; alias ``bfl``) | ``.alpha``  |
| xlabs     | ``double_blocks.N.processor.qkv_lora1.down.weight`` / ``.up`` (``qkv_lora2``: text, ``proj_lora1/2``) | none |

Text encoders (``ModelBundle.text_encoders``: the prefix names the encoder, the module is the
transformers model's own): diffusers ``text_encoder.<module>.lora_A.weight`` / ``lora_B`` (``text_encoder_2.``
...), diffcore / bfl the same with ``.alpha``; kohya and comfyui ``lora_te1_<module, _>.lora_down.weight``
/ ``lora_up`` + ``.alpha`` (``lora_te2_`` / ``lora_te3_`` for ``text_encoder_2`` / ``_3``; ``lora_te_``,
SD 1.x's single encoder, reads as ``text_encoder``); xlabs has none. Text-encoder keys are read the
same way whatever the file's format, and the format is detected from the network's keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

FORMATS = ("diffusers", "kohya", "comfyui", "diffcore", "bfl", "xlabs")
ALIASES = {"bfl": "diffcore", "peft": "diffusers"}

DIFFUSERS_PREFIXES = ("transformer.", "unet.", "base_model.model.")
KOHYA_TEXT = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
DIFFUSERS_TEXT = ("text_encoder.", "text_encoder_2.", "text_encoder_3.")
_PAIR_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_A.default.weight": "down",
                  ".lora_B.default.weight": "up", ".lora_down.weight": "down", ".lora_up.weight": "up",
                  ".alpha": "alpha"}
XLABS = {"qkv_lora1": "img_attn.qkv", "qkv_lora2": "txt_attn.qkv", "proj_lora1": "img_attn.proj",
         "proj_lora2": "txt_attn.proj"}
_XLABS_KEY = re.compile(r"^double_blocks\.(\d+)\.processor\.(qkv_lora[12]|proj_lora[12])\.(down|up)\.weight$")

Parsed = tuple[str, str, str]   # (module, role, naming)


def canonical(format: str) -> str:
    return ALIASES.get(format, format)


def detect(keys: Iterable[str]) -> str:
    """The format of a file from its key names (the first rule any key meets), the network's keys
    deciding when there are any: text-encoder keys look alike in several formats."""
    keys = list(keys)
    keys = [k for k in keys if not not_applicable(k)] or keys
    if any(k.startswith(("lora_unet_", "lora_transformer_", *KOHYA_TEXT)) for k in keys):
        return "kohya"
    if any(_XLABS_KEY.match(k) for k in keys):
        return "xlabs"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "comfyui"
    if any(k.startswith((*DIFFUSERS_PREFIXES, *DIFFUSERS_TEXT)) for k in keys):
        return "diffusers"
    return "diffcore"


# key pieces of adapter kinds that are not a plain low-rank pair (what the file is, for the error)
_OTHER_KINDS = ((".hada_w1_a", "LyCORIS LoHa"), (".lokr_w1", "LyCORIS LoKr"), (".oft_blocks", "OFT"),
                (".dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA"), (".ia3_l", "IA3"))


def other_kind(keys: Iterable[str]) -> str | None:
    """The name of an adapter kind diffcore does not apply (LoHa, LoKr, OFT, DoRA), if a key shows one."""
    for key in keys:
        for piece, kind in _OTHER_KINDS:
            if piece in key:
                return kind
    return None


def _suffix(key: str) -> tuple[str, str] | None:
    for suffix, role in _PAIR_SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def not_applicable(key: str) -> bool:
    """Whether ``key`` is a text encoder's rather than the network's."""
    return key.startswith((*KOHYA_TEXT, *DIFFUSERS_TEXT))


def kohya_text_prefix(prefix: str) -> str:
    """kohya's key prefix for a text encoder's file prefix: ``text_encoder_2`` -> ``lora_te2_``."""
    number = prefix.removeprefix("text_encoder").removeprefix("_") or "1"
    return f"lora_te{number}_"


def parse_text(key: str) -> tuple[str, str, str, str] | None:
    """(encoder prefix, module, role, naming ``ours`` or ``ours_``) of a text-encoder key; None
    for any other key."""
    split = _suffix(key)
    if split is None:
        return None
    module, role = split
    for prefix in DIFFUSERS_TEXT:
        if module.startswith(prefix):
            return prefix[:-1], module.removeprefix(prefix), role, "ours"
    for prefix in KOHYA_TEXT:
        if module.startswith(prefix):
            encoder = "text_encoder" if prefix in ("lora_te_", "lora_te1_") else f"text_encoder_{prefix[7]}"
            return encoder, module.removeprefix(prefix), role, "ours_"
    return None


def text_keys_for(format: str, prefix: str, module: str) -> dict[str, str]:
    """Role -> key for writing one text-encoder module's LoRA (``prefix``: ``text_encoder``...)."""
    format = canonical(format)
    if format == "diffusers":
        base = f"{prefix}.{module}"
        return {"down": f"{base}.lora_A.weight", "up": f"{base}.lora_B.weight"}
    if format in ("kohya", "comfyui"):
        base = kohya_text_prefix(prefix) + module.replace(".", "_")
        return {"down": f"{base}.lora_down.weight", "up": f"{base}.lora_up.weight", "alpha": f"{base}.alpha"}
    if format == "diffcore":
        base = f"{prefix}.{module}"
        return {"down": f"{base}.lora_A.weight", "up": f"{base}.lora_B.weight", "alpha": f"{base}.alpha"}
    raise KeyError(f"the {format} format holds no text-encoder LoRAs")


def parse(key: str, format: str) -> list[Parsed] | None:
    """The readings of ``key`` in ``format`` (a module name may be ours or diffusers'; the caller
    takes the one that names a layer); None: the key is no LoRA tensor of this format."""
    if format == "xlabs":
        m = _XLABS_KEY.match(key)
        return [(f"double_blocks.{m[1]}.{XLABS[m[2]]}", m[3], "ours")] if m else None
    split = _suffix(key)
    if split is None:
        return None
    module, role = split
    if format == "kohya":
        if module.startswith("lora_unet_"):
            bare = module.removeprefix("lora_unet_")
            return [(bare, role, "ours_"), (bare, role, "diffusers_")]
        if module.startswith("lora_transformer_"):
            return [(module.removeprefix("lora_transformer_"), role, "diffusers_")]
        return None
    if format == "comfyui":
        if not module.startswith("diffusion_model."):
            return None
        return [(module.removeprefix("diffusion_model."), role, "ours")]
    if format == "diffusers":
        for prefix in DIFFUSERS_PREFIXES:
            if module.startswith(prefix):
                bare = module.removeprefix(prefix)
                return [(bare, role, "diffusers"), (bare, role, "ours")]
        return None
    return [(module, role, "ours"), (module, role, "diffusers")]   # diffcore / bare keys


def keys_for(format: str, module: str, *, prefix: str = "transformer") -> dict[str, str]:
    """Role -> key for writing one module's LoRA (``module`` in the naming the format uses)."""
    format = canonical(format)
    if format == "diffusers":
        base = f"{prefix}.{module}"
        return {"down": f"{base}.lora_A.weight", "up": f"{base}.lora_B.weight"}
    if format == "kohya":
        base = "lora_unet_" + module.replace(".", "_")
        return {"down": f"{base}.lora_down.weight", "up": f"{base}.lora_up.weight", "alpha": f"{base}.alpha"}
    if format == "comfyui":
        base = f"diffusion_model.{module}"
        return {"down": f"{base}.lora_A.weight", "up": f"{base}.lora_B.weight", "alpha": f"{base}.alpha"}
    if format == "xlabs":
        m = re.match(r"^double_blocks\.(\d+)\.(img_attn\.qkv|txt_attn\.qkv|img_attn\.proj|txt_attn\.proj)$", module)
        if m is None:
            raise KeyError(module)
        name = {v: k for k, v in XLABS.items()}[m[2]]
        base = f"double_blocks.{m[1]}.processor.{name}"
        return {"down": f"{base}.down.weight", "up": f"{base}.up.weight"}
    if format == "diffcore":
        return {"down": f"{module}.lora_A.weight", "up": f"{module}.lora_B.weight", "alpha": f"{module}.alpha"}
    raise ValueError(f"unknown LoRA format {format!r}; known: {', '.join(FORMATS)}")
