"""FLUX.1 transformer keys: BFL <-> diffusers <-> ComfyUI, and telling them (and variants) apart.

One table (``_pairs``) lists, per BFL tensor, the diffusers tensors it is made of; both directions
read it. Fused tensors (``qkv``, ``linear1``) are split by sizes read from the tensors themselves,
never from constants, so the converters work for any width (diffusers' own converter assumes
hidden 3072). The final adaLN is stored (shift, scale) by BFL and (scale, shift) by diffusers.
Converters consume their input (pop as they go) and pass keys they do not know through unchanged,
so a loader reports them instead of silently dropping them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs
import torch
from torch import Tensor

from diffcore.api import CheckpointError, block_indices, meta_state, strip_prefix, swap_halves
from diffcore.api import detect_layout as layout_of
from diffcore_flux1.model import VARIANTS, FluxParams

COMFY_PREFIX = "model.diffusion_model."
FINAL_ADALN = "final_layer.adaLN_modulation.1"

_TOP = [
    ("img_in", ["x_embedder"]),
    ("txt_in", ["context_embedder"]),
    ("time_in.in_layer", ["time_text_embed.timestep_embedder.linear_1"]),
    ("time_in.out_layer", ["time_text_embed.timestep_embedder.linear_2"]),
    ("vector_in.in_layer", ["time_text_embed.text_embedder.linear_1"]),
    ("vector_in.out_layer", ["time_text_embed.text_embedder.linear_2"]),
    ("guidance_in.in_layer", ["time_text_embed.guidance_embedder.linear_1"]),
    ("guidance_in.out_layer", ["time_text_embed.guidance_embedder.linear_2"]),
    ("final_layer.linear", ["proj_out"]),
    (FINAL_ADALN, ["norm_out.linear"]),
]
_DOUBLE = [
    ("img_mod.lin", ["norm1.linear"]),
    ("txt_mod.lin", ["norm1_context.linear"]),
    ("img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
    ("txt_attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
    ("img_attn.proj", ["attn.to_out.0"]),
    ("txt_attn.proj", ["attn.to_add_out"]),
    ("img_mlp.0", ["ff.net.0.proj"]),
    ("img_mlp.2", ["ff.net.2"]),
    ("txt_mlp.0", ["ff_context.net.0.proj"]),
    ("txt_mlp.2", ["ff_context.net.2"]),
]
_DOUBLE_NORMS = [
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
]
_SINGLE = [
    ("modulation.lin", ["norm.linear"]),
    ("linear1", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]),
    ("linear2", ["proj_out"]),
]
_SINGLE_NORMS = [("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight")]


def _pairs(keys: Iterable[str], layout: str) -> list[tuple[str, list[str]]]:
    """(BFL key, [diffusers keys]) for every tensor the block counts in ``keys`` imply."""
    keys = list(keys)
    double_prefix, single_prefix = ("double_blocks", "single_blocks") if layout == "bfl" else \
        ("transformer_blocks", "single_transformer_blocks")
    out = []

    def linear(bfl: str, diff: list[str]) -> None:
        out.extend((f"{bfl}.{p}", [f"{d}.{p}" for d in diff]) for p in ("weight", "bias"))

    for bfl, diff in _TOP:
        linear(bfl, diff)
    for i in block_indices(keys, double_prefix):
        for bfl, diff in _DOUBLE:
            linear(f"double_blocks.{i}.{bfl}", [f"transformer_blocks.{i}.{d}" for d in diff])
        out.extend((f"double_blocks.{i}.{b}", [f"transformer_blocks.{i}.{d}"]) for b, d in _DOUBLE_NORMS)
    for i in block_indices(keys, single_prefix):
        for bfl, diff in _SINGLE:
            linear(f"single_blocks.{i}.{bfl}", [f"single_transformer_blocks.{i}.{d}" for d in diff])
        out.extend((f"single_blocks.{i}.{b}", [f"single_transformer_blocks.{i}.{d}"]) for b, d in _SINGLE_NORMS)
    return out


def diffusers_modules(modules: Iterable[str]) -> list[tuple[str, str]]:
    """(diffusers module name, ours) for each of our ``modules`` that diffusers has, from the
    tables above: a fused layer once per part (``img_attn.qkv`` as ``attn.to_q``, ``attn.to_k``,
    ``attn.to_v``; ``linear1`` also as ``proj_mlp``)."""
    wanted = set(modules)
    rows = [(d, b) for b, ds in _TOP for d in ds]
    for i in block_indices(wanted, "double_blocks"):
        rows += [(f"transformer_blocks.{i}.{d}", f"double_blocks.{i}.{b}") for b, ds in _DOUBLE for d in ds]
    for i in block_indices(wanted, "single_blocks"):
        rows += [(f"single_transformer_blocks.{i}.{d}", f"single_blocks.{i}.{b}") for b, ds in _SINGLE for d in ds]
    return [(d, b) for d, b in rows if b in wanted]


_FUSED_PARTS = {f"{d}.{p}" for table in (_DOUBLE, _SINGLE) for _, diff in table if len(diff) > 1
                for d in diff for p in ("weight", "bias")}


def fused_on_load(key: str) -> bool:
    """Whether the diffusers tensor ``key`` becomes part of a new one (fused qkv and linear1, the
    swapped final adaLN); ``load_model(copied=...)`` reads those into memory instead of mapping them."""
    return key.startswith("norm_out.linear.") or (
        key.startswith(("transformer_blocks.", "single_transformer_blocks.")) and key.split(".", 2)[-1] in _FUSED_PARTS)


def diffusers_to_bfl(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``FluxTransformer2DModel`` keys -> BFL keys (fusing q, k, v [, mlp])."""
    out = {}
    for bfl, diff in _pairs(sd, "diffusers"):
        if all(d in sd for d in diff):
            parts = [sd.pop(d) for d in diff]
            t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            out[bfl] = swap_halves(t) if bfl.startswith(FINAL_ADALN) else t
    out.update(sd)  # unknown keys travel on, to be reported by the loader
    sd.clear()
    return out


def bfl_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """BFL keys -> diffusers ``FluxTransformer2DModel`` keys (splitting ``qkv`` and ``linear1``).

    The hidden width comes from ``img_in``'s output rows; ``linear1`` is [q | k | v | mlp_in]
    with q, k, v each that wide and the MLP taking the rest."""
    out = {}
    if "img_in.weight" not in sd:
        raise CheckpointError("not a FLUX.1 transformer in BFL layout: no img_in.weight")
    hidden = sd["img_in.weight"].shape[0]
    for bfl, diff in _pairs(sd, "bfl"):
        if bfl not in sd:
            continue
        t = sd.pop(bfl)
        if bfl.startswith(FINAL_ADALN):
            t = swap_halves(t)
        if len(diff) == 1:
            out[diff[0]] = t
            continue
        sizes = [hidden] * 3 + ([t.shape[0] - 3 * hidden] if len(diff) == 4 else [])
        if sum(sizes) != t.shape[0] or min(sizes) <= 0:
            raise CheckpointError(f"{bfl} has {t.shape[0]} rows; expected {len(diff)} parts of hidden {hidden} "
                                  f"(3 x {hidden}{' + MLP' if len(diff) == 4 else ''})")
        out.update(zip(diff, t.split(sizes, dim=0)))
    out.update(sd)
    sd.clear()
    return out


def strip_comfy(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """ComfyUI (``model.diffusion_model.*``) -> BFL. Other parts of an all-in-one file (VAE, text
    encoders) are not the transformer's and are left out."""
    return strip_prefix(sd, (COMFY_PREFIX,))


# (what the file is, a key prefix or name only it has); checked in order on keys without their
# all-in-one prefix. FLUX.2 shares FLUX.1's BFL block names, so its shared modulation decides.
_FOREIGN = (
    ("a FLUX.2 transformer (shared double_stream_modulation_img / single_stream_modulation weights): "
     "load it with the flux2 family", ("double_stream_modulation_img.", "single_stream_modulation.")),
    ("an SDXL UNet (input_blocks.* with label_emb.*, the original layout)", ("label_emb.",)),
    ("an SDXL UNet (down_blocks.* with add_embedding.*, the diffusers layout)", ("add_embedding.",)),
    ("a Stable Diffusion 1.x / 2.x UNet (input_blocks.*)", ("input_blocks.",)),
    ("a Stable Diffusion UNet (down_blocks.*, the diffusers layout)", ("down_blocks.", "conv_in.weight")),
    ("an SD3 / SD3.5 MMDiT (joint_blocks.*)", ("joint_blocks.",)),
    ("an SD3 / SD3.5 or DiT transformer (pos_embed.*, the diffusers layout)", ("pos_embed.",)),
    ("an autoencoder (set it as vae)", ("encoder.down.", "encoder.down_blocks.", "decoder.up.", "decoder.up_blocks.")),
    ("a T5 text encoder", ("encoder.block.", "shared.weight")),
    ("a CLIP text encoder", ("text_model.",)),
)


def identify_foreign(keys: Iterable[str]) -> str | None:
    """What a checkpoint that is not a FLUX.1 transformer looks like, from its keys (None: it may be one)."""
    bare = {k.removeprefix(COMFY_PREFIX).removeprefix("diffusion_model.") for k in keys}
    for what, markers in _FOREIGN:
        if any(k.startswith(markers) for k in bare):
            return what
    return None


LAYOUTS = {"comfyui": (COMFY_PREFIX,), "bfl": ("img_in.weight", "double_blocks."),
           "diffusers": ("x_embedder.weight", "transformer_blocks.")}


def detect_layout(keys: Iterable[str]) -> str:
    """``"bfl"``, ``"diffusers"`` or ``"comfyui"`` from a transformer checkpoint's key names."""
    keys = set(keys)
    foreign = identify_foreign(keys)
    if foreign is not None:
        raise CheckpointError(f"not a FLUX.1 transformer: the keys are those of {foreign}")
    return layout_of(keys, LAYOUTS, "a FLUX.1 transformer checkpoint")


def to_bfl(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Any supported layout -> BFL (the ``rename`` to give ``diffcore.io.checkpoint.load_model``)."""
    layout = detect_layout(sd)
    if layout == "comfyui":
        return strip_comfy(sd)
    return diffusers_to_bfl(sd) if layout == "diffusers" else sd


def _bfl_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    return to_bfl(meta_state(shapes))


def infer_params(shapes: Mapping[str, tuple[int, ...]], axes_dim: tuple[int, ...] | None = None) -> FluxParams:
    """``FluxParams`` from tensor shapes in any layout. RoPE axes are not in a checkpoint: give
    ``axes_dim`` unless the head dim is FLUX.1's 128 (axes (16, 56, 56))."""
    sd = _bfl_shapes(shapes)
    try:
        hidden, in_channels = sd["img_in.weight"].shape
        head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        mlp_hidden = sd["double_blocks.0.img_mlp.0.weight"].shape[0]
        out_channels = sd["final_layer.linear.weight"].shape[0]
        vec_in_dim, context_in_dim = sd["vector_in.in_layer.weight"].shape[1], sd["txt_in.weight"].shape[1]
    except KeyError as exc:
        raise CheckpointError(f"not a complete FLUX.1 transformer: {exc.args[0]} is missing") from None
    if axes_dim is None and head_dim != 128:
        raise CheckpointError(f"head dim {head_dim} is not FLUX.1's 128: pass the RoPE axes (axes_dim), "
                              f"they are not stored in checkpoints")
    return FluxParams(
        in_channels=in_channels, out_channels=out_channels, vec_in_dim=vec_in_dim, context_in_dim=context_in_dim,
        hidden_size=hidden, mlp_ratio=mlp_hidden / hidden, num_heads=hidden // head_dim,
        depth=len(block_indices(sd, "double_blocks")), depth_single_blocks=len(block_indices(sd, "single_blocks")),
        axes_dim=axes_dim or (16, 56, 56), qkv_bias="double_blocks.0.img_attn.qkv.bias" in sd,
        guidance_embed="guidance_in.in_layer.weight" in sd)


def detect_variant(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The first ``VARIANTS`` row whose shapes match: guidance embedding -> dev, none -> schnell,
    384 input channels -> fill-dev, 128 -> canny-dev. Kontext-dev has dev's shapes and depth-dev
    canny-dev's, so those two are only reached by naming them."""
    found = infer_params(shapes, axes_dim=(0,))  # axes are not in the file: compare everything else
    for name, params in VARIANTS.items():
        if attrs.evolve(params, axes_dim=(0,)) == found:
            return name
    dev = VARIANTS["dev"]
    differs = {f.name: getattr(found, f.name) for f in attrs.fields(FluxParams)
               if f.name != "axes_dim" and getattr(found, f.name) != getattr(dev, f.name)}
    raise CheckpointError(f"FLUX.1 weights of no known variant ({', '.join(VARIANTS)}); "
                          f"they differ from dev in {differs}")
