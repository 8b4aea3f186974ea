"""SDXL UNet keys: Stability (``input_blocks.*``, ours) <-> diffusers (``down_blocks.*``), and
telling layouts, variants and other families' files apart.

The two layouts hold the same tensors under other names (no fusing, no reordering), so one
prefix table (``prefix_pairs``) serves both directions; it is built from the UNet's structure
(levels, blocks per level, which levels have attention), which ``structure`` reads off the keys
of either layout. Converters consume their input and pass keys they do not know through, so a
loader reports them instead of silently dropping them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from diffcore.api import CheckpointError
from diffcore_sdxl.params import VARIANTS, UNetParams

STABILITY_PREFIX = "model.diffusion_model."   # Stability single files and ComfyUI checkpoints
RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
          "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_RESNET_BACK = {v: k for k, v in RESNET.items()}
_TOP = [("input_blocks.0.0", "conv_in"), ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"), ("label_emb.0.0", "add_embedding.linear_1"),
        ("label_emb.0.2", "add_embedding.linear_2"), ("out.0", "conv_norm_out"), ("out.2", "conv_out")]


class Structure(NamedTuple):
    levels: int
    num_res_blocks: int
    attention: tuple[bool, ...]   # per level


def prefix_pairs(s: Structure) -> list[tuple[str, str, bool]]:
    """(Stability prefix, diffusers prefix, is a ResBlock) for every module of a UNet of structure ``s``."""
    n = s.num_res_blocks + 1
    out = [(a, b, False) for a, b in _TOP]
    for level in range(s.levels):
        for j in range(s.num_res_blocks):
            index = 1 + level * n + j
            out.append((f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}", True))
            if s.attention[level]:
                out.append((f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}", False))
        if level != s.levels - 1:
            out.append((f"input_blocks.{(level + 1) * n}.0.op", f"down_blocks.{level}.downsamplers.0.conv", False))
    out += [("middle_block.0", "mid_block.resnets.0", True), ("middle_block.1", "mid_block.attentions.0", False),
            ("middle_block.2", "mid_block.resnets.1", True)]
    for up in range(s.levels):                      # diffusers counts the way up from the bottom
        level = s.levels - 1 - up
        for j in range(n):
            index = up * n + j
            out.append((f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{j}", True))
            if s.attention[level]:
                out.append((f"output_blocks.{index}.1", f"up_blocks.{up}.attentions.{j}", False))
            if level and j == n - 1:
                out.append((f"output_blocks.{index}.{2 if s.attention[level] else 1}.conv",
                            f"up_blocks.{up}.upsamplers.0.conv", False))
    return out


def _indices(keys: Iterable[str], pattern: str) -> set[int]:
    regex = re.compile(pattern)
    return {int(m.group(1)) for k in keys if (m := regex.match(k))}


def structure(keys: Iterable[str], layout: str) -> Structure:
    """The UNet's levels, blocks per level and attention levels, from its keys in ``layout``."""
    keys = list(keys)
    if layout == "diffusers":
        levels = len(_indices(keys, r"down_blocks\.(\d+)\."))
        blocks = len(_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\."))
        attention = tuple(bool(_indices(keys, rf"down_blocks\.{i}\.attentions\.(\d+)\.")) for i in range(levels))
    else:
        levels = len(_indices(keys, r"input_blocks\.(\d+)\.0\.op\.")) + 1
        blocks = len(_indices(keys, r"input_blocks\.(\d+)\.0\.in_layers\.")) // levels
        attention = tuple(f"input_blocks.{1 + i * (blocks + 1)}.1.norm.weight" in keys for i in range(levels))
    if not levels or not blocks:
        raise CheckpointError(f"no SDXL UNet blocks found in the {layout} layout")
    return Structure(levels, blocks, attention)


def _rename(sd: dict[str, Tensor], table: Mapping[str, tuple[str, bool]], resnet_names: Mapping[str, str],
            depth: int) -> dict[str, Tensor]:
    out = {}
    for key in list(sd):
        parts = key.split(".")
        for k in range(min(depth, len(parts) - 1), 0, -1):
            prefix = ".".join(parts[:k])
            if prefix in table:
                target, resnet = table[prefix]
                rest = ".".join(parts[k:])
                if resnet:
                    head, _, leaf = rest.rpartition(".")
                    if head not in resnet_names:
                        break
                    rest = f"{resnet_names[head]}.{leaf}"
                out[f"{target}.{rest}"] = sd.pop(key)
                break
    out.update(sd)   # unknown keys travel on, to be reported by the loader
    sd.clear()
    return out


def to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Stability keys (bare) -> diffusers ``UNet2DConditionModel`` keys."""
    table = {a: (b, r) for a, b, r in prefix_pairs(structure(sd, "stability"))}
    return _rename(sd, table, RESNET, depth=5)


def diffusers_to_stability(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``UNet2DConditionModel`` keys -> Stability keys (bare, no ``model.diffusion_model.``)."""
    table = {b: (a, r) for a, b, r in prefix_pairs(structure(sd, "diffusers"))}
    return _rename(sd, table, _RESNET_BACK, depth=5)


# (what the file is, a key prefix only it has), checked in order on keys without a model prefix
_FOREIGN = (
    ("a FLUX.2 transformer (load it with the flux2 family)", ("double_stream_modulation_img.",)),
    ("a FLUX.1 transformer (load it with the flux1 family)", ("double_blocks.", "single_blocks.",
                                                              "single_transformer_blocks.")),
    ("an SD3 / SD3.5 MMDiT (joint_blocks.*), not SDXL", ("joint_blocks.",)),
    ("an SD3 / SD3.5 or DiT transformer (transformer_blocks.* with pos_embed.*), not SDXL", ("pos_embed.",)),
    ("an autoencoder (set it as vae)", ("encoder.down.", "encoder.down_blocks.", "decoder.up.", "decoder.up_blocks.")),
    ("a text encoder", ("text_model.", "encoder.block.", "shared.weight")),
)


def _bare(key: str) -> str:
    for prefix in (STABILITY_PREFIX, "unet.", "diffusion_model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def identify_foreign(keys: Iterable[str]) -> str | None:
    """What a checkpoint that is not an SDXL UNet looks like, from its keys (None: it may be one).
    A Stable Diffusion 1.x / 2.x UNet has SDXL's block names but no label embedding."""
    bare = {_bare(k) for k in keys}
    for what, markers in _FOREIGN:
        if any(k.startswith(markers) for k in bare):
            return what
    unet = any(k.startswith(("input_blocks.", "down_blocks.")) for k in bare)
    if unet and not any(k.startswith(("label_emb.", "add_embedding.")) for k in bare):
        return ("a Stable Diffusion 1.x / 2.x UNet (SD1.5-style: no label_emb / add_embedding, the SDXL "
                "pooled-text and size conditioning): SD1.5 and SD2 are not supported")
    return None


def detect_layout(keys: Iterable[str]) -> str:
    """``"stability"`` (bare ``input_blocks.*``), ``"single-file"`` (``model.diffusion_model.*``,
    Stability's and ComfyUI's all-in-one files) or ``"diffusers"`` from a UNet checkpoint's keys."""
    keys = set(keys)
    foreign = identify_foreign(keys)
    if foreign is not None:
        raise CheckpointError(f"not an SDXL UNet: the keys are those of {foreign}")
    if any(k.startswith(STABILITY_PREFIX) for k in keys):
        return "single-file"
    if any(k.startswith("input_blocks.") for k in keys):
        return "stability"
    if any(k.startswith(("down_blocks.", "unet.down_blocks.")) for k in keys):
        return "diffusers"
    raise CheckpointError("not an SDXL UNet checkpoint: none of input_blocks.* (Stability), down_blocks.* "
                          f"(diffusers) or {STABILITY_PREFIX}* (single file) is present; "
                          f"first keys: {', '.join(sorted(keys)[:5])}")


def to_stability(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Any supported layout -> bare Stability keys (the ``rename`` for ``load_model``). The other
    parts of an all-in-one file (VAE, text encoders) are not the UNet's and are left out."""
    layout = detect_layout(sd)
    if layout == "single-file":
        out = {k[len(STABILITY_PREFIX):]: v for k, v in sd.items() if k.startswith(STABILITY_PREFIX)}
        sd.clear()
        return out
    if layout == "diffusers":
        return diffusers_to_stability({k.removeprefix("unet."): v for k, v in sd.items()})
    return sd


def _count(keys: Iterable[str], prefix: str) -> int:
    return len(_indices(keys, re.escape(prefix) + r"\.transformer_blocks\.(\d+)\."))


def infer_params(shapes: Mapping[str, tuple[int, ...]], *, head_dim: int = 64,
                 time_embed_scalar_dim: int = 256) -> UNetParams:
    """``UNetParams`` from tensor shapes in any layout. The head width and the micro-conditioning
    sinusoid width are not stored in checkpoints: SDXL's (64, 256) unless given."""
    sd = to_stability({k: _Shape(s) for k, s in shapes.items()})
    s = structure(sd, "stability")
    n = s.num_res_blocks + 1
    try:
        model_channels, in_channels = sd["input_blocks.0.0.weight"].shape[:2]
        widths = [sd[f"input_blocks.{1 + level * n}.0.in_layers.2.weight"].shape[0] for level in range(s.levels)]
        depth = tuple(_count(sd, f"input_blocks.{1 + level * n}.1") for level in range(s.levels))
        context = next(v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight"))
        adm = sd["label_emb.0.0.weight"].shape[1]
        out_channels = sd["out.2.weight"].shape[0]
    except (KeyError, StopIteration) as exc:
        raise CheckpointError(f"not a complete SDXL UNet: {exc.args[0] if exc.args else 'attn2.to_k'} is missing") \
            from None
    if any(w % model_channels for w in widths):
        raise CheckpointError(f"UNet level widths {widths} are not multiples of the first conv's {model_channels}")
    return UNetParams(in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
                      channel_mult=tuple(w // model_channels for w in widths), num_res_blocks=s.num_res_blocks,
                      transformer_depth=depth, transformer_depth_middle=_count(sd, "middle_block.1"),
                      head_dim=head_dim, context_dim=context, adm_in_channels=adm,
                      time_embed_scalar_dim=time_embed_scalar_dim)


class _Shape:
    """A tensor's stand-in for renaming shapes: only ``.shape`` is read."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)


def detect_variant(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The ``VARIANTS`` row whose numbers the weights have (None: no row fits)."""
    for name, row in VARIANTS.items():
        if infer_params(shapes, head_dim=row.head_dim, time_embed_scalar_dim=row.time_embed_scalar_dim) == row:
            return name
    return None


def diffusers_modules(shapes: Mapping[str, tuple[int, ...]], modules: Iterable[str]) -> list[tuple[str, str]]:
    """(diffusers ``UNet2DConditionModel`` module name, ours) for each of our ``modules``: the
    network's tensor shapes (all of them: the block counts come from them) renamed by
    ``to_diffusers``, each of ours followed to its new name. Every SDXL linear is one of diffusers'."""
    wanted = set(modules)
    tags = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    renamed = {id(t): k for k, t in to_diffusers(dict(tags)).items()}
    rows = []
    for key, tag in tags.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module in wanted and id(tag) in renamed:
            rows.append((renamed[id(tag)].removesuffix(".weight"), module))
    return rows
