"""FLUX.2 transformer weights: BFL <-> diffusers <-> ComfyUI keys, layout and variant detection.

BFL's layout is ours (``Flux2``'s state dict). diffusers (``Flux2Transformer2DModel``) splits the
double blocks' fused qkv into to_q / to_k / to_v, renames everything else and stores the final
adaLN as (scale, shift) where BFL has (shift, scale). ComfyUI files are BFL's keys under
``model.diffusion_model.``. Every dimension is read from tensor shapes, so any size converts;
the functions work on meta tensors too, which is how shapes alone are checked.

diffusers' single-file loader calls every FLUX.2 file "flux-2-dev"; ``detect_variant`` reads the
hidden size, block counts, text width and guidance embedding instead. klein and klein-base share
every shape (base is the undistilled model), so only a name hint (``"base"`` in the file name)
tells them apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from diffcore.api import CheckpointError, meta_state, strip_prefix, swap_halves  # noqa: F401 (meta_state: for callers)
from diffcore.api import block_indices
from diffcore.api import detect_layout as layout_of
from diffcore_flux2.params import TAGGED, VARIANTS, Flux2Params

COMFYUI_PREFIX = "model.diffusion_model."

_TOP = {  # BFL -> diffusers
    "img_in.weight": "x_embedder.weight",
    "txt_in.weight": "context_embedder.weight",
    "time_in.in_layer.weight": "time_guidance_embed.timestep_embedder.linear_1.weight",
    "time_in.out_layer.weight": "time_guidance_embed.timestep_embedder.linear_2.weight",
    "guidance_in.in_layer.weight": "time_guidance_embed.guidance_embedder.linear_1.weight",
    "guidance_in.out_layer.weight": "time_guidance_embed.guidance_embedder.linear_2.weight",
    "double_stream_modulation_img.lin.weight": "double_stream_modulation_img.linear.weight",
    "double_stream_modulation_txt.lin.weight": "double_stream_modulation_txt.linear.weight",
    "single_stream_modulation.lin.weight": "single_stream_modulation.linear.weight",
    "final_layer.linear.weight": "proj_out.weight",
}
_FINAL_ADALN = ("final_layer.adaLN_modulation.1.weight", "norm_out.linear.weight")  # halves swapped
_DOUBLE = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "img_attn.proj.weight": "attn.to_out.0.weight",
    "img_mlp.0.weight": "ff.linear_in.weight",
    "img_mlp.2.weight": "ff.linear_out.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "txt_attn.proj.weight": "attn.to_add_out.weight",
    "txt_mlp.0.weight": "ff_context.linear_in.weight",
    "txt_mlp.2.weight": "ff_context.linear_out.weight",
}
_DOUBLE_QKV = {
    "img_attn.qkv.weight": ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight"),
    "txt_attn.qkv.weight": ("attn.add_q_proj.weight", "attn.add_k_proj.weight", "attn.add_v_proj.weight"),
}
_SINGLE = {
    "linear1.weight": "attn.to_qkv_mlp_proj.weight",
    "linear2.weight": "attn.to_out.weight",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
_BFL_BLOCK = re.compile(r"(double|single)_blocks\.(\d+)\.(.+)")
_DIFFUSERS_BLOCK = re.compile(r"(single_)?transformer_blocks\.(\d+)\.(.+)")


LAYOUTS = {"comfyui": (COMFYUI_PREFIX + "double_stream_modulation_img.",),
           "bfl": ("double_stream_modulation_img.lin.weight",),
           "diffusers": ("double_stream_modulation_img.linear.weight",)}


def detect_layout(keys: Sequence[str] | Mapping[str, object]) -> str:
    """``"bfl"``, ``"diffusers"`` or ``"comfyui"`` for a FLUX.2 transformer's keys: the shared
    double-stream modulation (``lin`` in BFL's, ``linear`` in diffusers' names) tells them apart."""
    return layout_of(keys, LAYOUTS, "a FLUX.2 transformer")


def bfl_to_diffusers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """BFL keys -> ``Flux2Transformer2DModel`` keys; consumes ``state`` (pops as it goes)."""
    out: dict[str, Tensor] = {}
    for key in list(state):
        if key in _TOP:
            out[_TOP[key]] = state.pop(key)
        elif key == _FINAL_ADALN[0]:
            out[_FINAL_ADALN[1]] = swap_halves(state.pop(key))
        elif m := _BFL_BLOCK.fullmatch(key):
            kind, index, name = m.groups()
            if kind == "double" and name in _DOUBLE_QKV:
                for new, part in zip(_DOUBLE_QKV[name], state.pop(key).chunk(3, dim=0)):
                    out[f"transformer_blocks.{index}.{new}"] = part
            elif kind == "double" and name in _DOUBLE:
                out[f"transformer_blocks.{index}.{_DOUBLE[name]}"] = state.pop(key)
            elif kind == "single" and name in _SINGLE:
                out[f"single_transformer_blocks.{index}.{_SINGLE[name]}"] = state.pop(key)
    _leftovers(state, "BFL")
    return out


_TOP_BACK = {v: k for k, v in _TOP.items()}
_DOUBLE_BACK = {v: k for k, v in _DOUBLE.items()}
_SINGLE_BACK = {v: k for k, v in _SINGLE.items()}
_QKV_PART = {new: (fused, i) for fused, news in _DOUBLE_QKV.items() for i, new in enumerate(news)}


def fused_on_load(key: str) -> bool:
    """Whether the diffusers tensor ``key`` becomes part of a new one (a double block's fused qkv,
    the swapped final adaLN); ``load_model(copied=...)`` reads those into memory instead of mapping them."""
    return key == _FINAL_ADALN[1] or (key.startswith("transformer_blocks.") and key.split(".", 2)[-1] in _QKV_PART)


def diffusers_to_bfl(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``Flux2Transformer2DModel`` keys -> BFL keys (q, k, v fused back); consumes ``state``."""
    out: dict[str, Tensor] = {}
    qkv: dict[str, list[Tensor | None]] = {}
    for key in list(state):
        if key in _TOP_BACK:
            out[_TOP_BACK[key]] = state.pop(key)
        elif key == _FINAL_ADALN[1]:
            out[_FINAL_ADALN[0]] = swap_halves(state.pop(key))
        elif m := _DIFFUSERS_BLOCK.fullmatch(key):
            single, index, name = m.groups()
            if single and name in _SINGLE_BACK:
                out[f"single_blocks.{index}.{_SINGLE_BACK[name]}"] = state.pop(key)
            elif not single and name in _DOUBLE_BACK:
                out[f"double_blocks.{index}.{_DOUBLE_BACK[name]}"] = state.pop(key)
            elif not single and name in _QKV_PART:
                fused, part = _QKV_PART[name]
                qkv.setdefault(f"double_blocks.{index}.{fused}", [None] * 3)[part] = state.pop(key)
    for key, parts in qkv.items():
        if any(p is None for p in parts):
            absent = [n for n, p in zip("qkv", parts) if p is None]
            raise CheckpointError(f"diffusers FLUX.2 checkpoint lacks the {'/'.join(absent)} projection(s) "
                                  f"that fuse into {key}")
        out[key] = torch.cat(parts, dim=0)
    _leftovers(state, "diffusers")
    return out


def _leftovers(state: Mapping[str, Tensor], layout: str) -> None:
    if state:
        keys = sorted(state)
        raise CheckpointError(f"{len(keys)} key(s) of this {layout}-layout FLUX.2 checkpoint have no counterpart "
                              f"in FLUX.2's transformer: {', '.join(keys[:5])}")


def to_bfl(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Any FLUX.2 layout (BFL, diffusers, ComfyUI) -> BFL keys, the ``rename`` for ``load_model``."""
    layout = detect_layout(state)
    if layout == "diffusers":
        return diffusers_to_bfl(state)
    if layout == "comfyui":  # an all-in-one file's other parts (VAE, text encoder) are left out
        state = strip_prefix(state, (COMFYUI_PREFIX,))
    _leftovers({k: v for k, v in state.items() if not _is_bfl_key(k)}, "BFL")
    return state


def _is_bfl_key(key: str) -> bool:
    if key in _TOP or key == _FINAL_ADALN[0]:
        return True
    m = _BFL_BLOCK.fullmatch(key)
    return bool(m) and m.group(3) in (_SINGLE if m.group(1) == "single" else {**_DOUBLE, **_DOUBLE_QKV})


def params_from_state(state: Mapping[str, Tensor]) -> Flux2Params:
    """The shape of the transformer behind a state dict in any layout (tensors or meta tensors).

    The RoPE split cannot be read from weights: 128-dim heads get FLUX.2's (32, 32, 32, 32),
    other head sizes four equal axes.
    """
    sd = to_bfl(dict(state))
    try:
        hidden, in_channels = sd["img_in.weight"].shape
        context = sd["txt_in.weight"].shape[1]
    except KeyError as exc:
        raise CheckpointError(f"FLUX.2 checkpoint lacks {exc.args[0]}") from None
    depth = _count(sd, "double_blocks")
    single = _count(sd, "single_blocks")
    norm = sd.get("double_blocks.0.img_attn.norm.query_norm.scale", sd.get("single_blocks.0.norm.query_norm.scale"))
    if norm is None:
        raise CheckpointError("FLUX.2 checkpoint has neither double nor single blocks")
    head_dim = norm.shape[0]
    mlp = (sd["single_blocks.0.linear2.weight"].shape[1] - hidden if single
           else sd["double_blocks.0.img_mlp.2.weight"].shape[1])
    if hidden % head_dim or head_dim % 8:
        raise CheckpointError(f"FLUX.2 checkpoint: hidden size {hidden} with {head_dim}-dim heads "
                              f"(head dim must divide the hidden size and split into 4 even RoPE axes)")
    return Flux2Params(hidden_size=hidden, num_heads=hidden // head_dim, depth=depth, depth_single_blocks=single,
                       context_in_dim=context, guidance_embed="guidance_in.in_layer.weight" in sd,
                       in_channels=in_channels, mlp_ratio=mlp / hidden, axes_dim=(head_dim // 4,) * 4)


def _count(sd: Mapping[str, Tensor], prefix: str) -> int:
    indices = {int(m.group(2)) for k in sd if (m := _BFL_BLOCK.fullmatch(k)) and m.group(1) + "_blocks" == prefix}
    if indices and indices != set(range(len(indices))):
        raise CheckpointError(f"FLUX.2 checkpoint's {prefix} are not numbered 0..{len(indices) - 1}: "
                              f"{sorted(indices)}")
    return len(indices)


def detect_variant(state: Mapping[str, Tensor], hint: str = "") -> str:
    """The row of ``VARIANTS`` whose shapes match the state dict (any layout; meta tensors are fine).

    klein-base-* and klein-9b-kv have klein-*'s shapes: a tagged variant is returned only when
    ``hint`` (a file name, say) carries its tag ("base", "kv") as a word.
    """
    p = params_from_state(state)
    matches = [name for name, row in VARIANTS.items() if row == p]
    if not matches:
        raise CheckpointError(
            f"FLUX.2 checkpoint matches no known variant: hidden {p.hidden_size} ({p.num_heads} heads), "
            f"{p.depth} double + {p.depth_single_blocks} single blocks, text width {p.context_in_dim}, "
            f"guidance embedding {'yes' if p.guidance_embed else 'no'}; known: "
            + "; ".join(f"{n} {v.hidden_size}/{v.depth}+{v.depth_single_blocks}/{v.context_in_dim}"
                        for n, v in VARIANTS.items()))
    for tag in TAGGED:
        tagged = [n for n in matches if tag in n.split("-")]
        if tagged and re.search(rf"(?<![a-z0-9]){tag}(?![a-z0-9])", hint.lower()):
            return tagged[0]
    return next((n for n in matches if not set(TAGGED) & set(n.split("-"))), matches[0])


def diffusers_modules(modules: Iterable[str]) -> list[tuple[str, str]]:
    """(diffusers module name, ours) for each of our ``modules`` that diffusers has, read off the
    weight tables above; the double blocks' fused ``qkv`` appears once per part (``img_attn.qkv`` as
    ``attn.to_q``, ``attn.to_k`` and ``attn.to_v``). LoRA target patterns in diffusers' naming
    are matched against these."""
    wanted = set(modules)

    def module(key: str) -> str:
        return key.removesuffix(".weight")

    rows = [(module(d), module(b)) for b, d in {**_TOP, _FINAL_ADALN[0]: _FINAL_ADALN[1]}.items()]
    for i in block_indices(wanted, "double_blocks"):
        pairs = [(d, b) for b, d in _DOUBLE.items()] + [(d, b) for b, ds in _DOUBLE_QKV.items() for d in ds]
        rows += [(f"transformer_blocks.{i}.{module(d)}", f"double_blocks.{i}.{module(b)}") for d, b in pairs]
    for i in block_indices(wanted, "single_blocks"):
        rows += [(f"single_transformer_blocks.{i}.{module(d)}", f"single_blocks.{i}.{module(b)}")
                 for b, d in _SINGLE.items()]
    return [(d, b) for d, b in rows if b in wanted]
