"""The text encoders inside a Stability (or ComfyUI) all-in-one SDXL checkpoint, as transformers' CLIP.

Stability's ``conditioner.embedders.N`` hold, in the base, CLIP ViT-L/14 at 0 in transformers' own
keys under ``transformer.`` and OpenCLIP ViT-bigG/14 at 1 in open_clip's keys under ``model.``;
the refiner has bigG alone, at 0. OpenCLIP differs from transformers in names (``resblocks`` /
``ln_1`` / ``c_fc``), in one fused ``in_proj`` for q, k, v, and in a ``text_projection`` used as
``x @ P`` (transformers' Linear weight is its transpose).

A file has no configs: the sizes come from the shapes, the heads from a 64-wide head (every
released CLIP text tower), the activation from the kind (OpenAI's QuickGELU, OpenCLIP's GELU), the
special token ids from the tokenizer; a folder's ``text_encoder*/config.json`` overrides them.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

EMBEDDERS = "conditioner.embedders."
CLIP_L, BIG_G = "clip-l", "bigG"

# open_clip name piece -> transformers' (inside one layer)
_LAYER_NAMES = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
                ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj."))
_TOP_NAMES = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
              "positional_embedding": "text_model.embeddings.position_embedding.weight",
              "ln_final.weight": "text_model.final_layer_norm.weight",
              "ln_final.bias": "text_model.final_layer_norm.bias"}
_IGNORED = ("logit_scale", "attn_mask", "text_model.embeddings.position_ids")


def embedders(keys: Any) -> dict[int, str]:
    """``{index: CLIP_L or BIG_G}`` of the text encoders in an all-in-one file's ``keys``."""
    found: dict[int, str] = {}
    for key in keys:
        m = re.match(rf"{re.escape(EMBEDDERS)}(\d+)\.(transformer\.text_model|model\.transformer)\.", key)
        if m:
            found[int(m.group(1))] = CLIP_L if m.group(2).startswith("transformer") else BIG_G
    return dict(sorted(found.items()))


def prefix(index: int, kind: str) -> str:
    return f"{EMBEDDERS}{index}.{'transformer.' if kind == CLIP_L else 'model.'}"


def from_stability(sd: dict[str, Tensor], index: int, kind: str) -> dict[str, Tensor]:
    """Embedder ``index``'s tensors of ``sd`` (a whole file's) in transformers' CLIP keys."""
    head = prefix(index, kind)
    own = {k[len(head):]: v for k, v in sd.items() if k.startswith(head) and not k.endswith(_IGNORED)}
    if kind == CLIP_L:
        return own
    out: dict[str, Tensor] = {}
    for key, value in own.items():
        if key in _TOP_NAMES:
            out[_TOP_NAMES[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.T.contiguous()
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key):
            layer, rest = f"text_model.encoder.layers.{m.group(1)}.", m.group(2)
            if rest.startswith("attn.in_proj_"):
                kind_ = rest.rsplit("_", 1)[-1]   # weight | bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{layer}self_attn.{name}.{kind_}"] = part.contiguous()
                continue
            for old, new in _LAYER_NAMES:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            out[layer + rest] = value
        else:
            raise KeyError(f"{head}{key}: not an OpenCLIP text-tower key")
    return out


def canonical(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keys under ``text_model.`` as the files have them (transformers 5 names a ``CLIPTextModel``'s
    own state dict without that prefix; its ``WithProjection`` keeps it)."""
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v for k, v in sd.items()}


def fit(sd: dict[str, Tensor], model: torch.nn.Module) -> dict[str, Tensor]:
    """``sd`` (canonical keys) in the names ``model``'s own state dict uses."""
    if any(k.startswith("text_model.") for k in model.state_dict()):
        return sd
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def to_stability(sd: dict[str, Tensor], index: int, kind: str) -> dict[str, Tensor]:
    """transformers' CLIP tensors ``sd`` as embedder ``index`` of an all-in-one file (the inverse)."""
    head, sd = prefix(index, kind), canonical(sd)
    if kind == CLIP_L:
        return {head + k: v for k, v in sd.items() if not k.endswith(_IGNORED)}
    top = {v: k for k, v in _TOP_NAMES.items()}
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        if key.endswith(_IGNORED):
            continue
        if key in top:
            out[head + top[key]] = value
        elif key == "text_projection.weight":
            out[head + "text_projection"] = value.T.contiguous()
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key):
            layer, rest = f"{head}transformer.resblocks.{m.group(1)}.", m.group(2)
            if q := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                fused.setdefault(f"{layer}attn.in_proj_{q.group(2)}", {})[q.group(1)] = value
                continue
            for old, new in _LAYER_NAMES:
                if rest.startswith(new):
                    rest = old + rest[len(new):]
                    break
            out[layer + rest] = value
        else:
            raise KeyError(f"{key}: not a transformers CLIP text-model key")
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def config_from_shapes(sd: dict[str, Tensor], kind: str, tokenizer: Any) -> dict[str, Any]:
    """``CLIPTextConfig`` fields of transformers-keyed tensors ``sd`` (see the module's docstring):
    the core's ``clip_config_fields``, with CLIP-L's quick GELU or bigG's GELU."""
    from diffcore.api import clip_config_fields

    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    return clip_config_fields(shapes, hidden_act="quick_gelu" if kind == CLIP_L else "gelu", tokenizer=tokenizer)
