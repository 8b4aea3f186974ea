"""SD3 / SD3.5 MMDiT keys: Stability's original <-> diffusers, the single-file prefix, and telling
layouts, variants and other families' files apart.

One table (``_pairs``) lists, per original tensor, the diffusers tensors it is made of; both
directions read it. Fused ``qkv`` tensors are split in three equal parts, so the converters work
for any width. The final layer's adaLN and the last block's context adaLN are stored (shift,
scale) in the original and (scale, shift) in diffusers. Converters consume their input (pop as
they go) and pass keys they do not know through unchanged, so a loader reports them instead of
silently dropping them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import attrs
import torch
from torch import Tensor

from diffcore.api import CheckpointError, block_indices, meta_state, swap_halves
from diffcore.api import strip_prefix as _strip
from diffcore_sd3.params import VARIANTS, SD3Params

PREFIX = "model.diffusion_model."   # Stability's and ComfyUI's all-in-one files
FINAL_ADALN = "final_layer.adaLN_modulation.1"

_TOP = [
    ("x_embedder.proj", ["pos_embed.proj"]),
    ("t_embedder.mlp.0", ["time_text_embed.timestep_embedder.linear_1"]),
    ("t_embedder.mlp.2", ["time_text_embed.timestep_embedder.linear_2"]),
    ("y_embedder.mlp.0", ["time_text_embed.text_embedder.linear_1"]),
    ("y_embedder.mlp.2", ["time_text_embed.text_embedder.linear_2"]),
    ("context_embedder", ["context_embedder"]),
    ("final_layer.linear", ["proj_out"]),
    (FINAL_ADALN, ["norm_out.linear"]),
]
_BLOCK = [
    ("context_block.adaLN_modulation.1", ["norm1_context.linear"]),
    ("context_block.attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
    ("context_block.attn.proj", ["attn.to_add_out"]),
    ("context_block.mlp.fc1", ["ff_context.net.0.proj"]),
    ("context_block.mlp.fc2", ["ff_context.net.2"]),
    ("x_block.adaLN_modulation.1", ["norm1.linear"]),
    ("x_block.attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
    ("x_block.attn.proj", ["attn.to_out.0"]),
    ("x_block.attn2.qkv", ["attn2.to_q", "attn2.to_k", "attn2.to_v"]),
    ("x_block.attn2.proj", ["attn2.to_out.0"]),
    ("x_block.mlp.fc1", ["ff.net.0.proj"]),
    ("x_block.mlp.fc2", ["ff.net.2"]),
]
_NORMS = [
    ("context_block.attn.ln_q.weight", "attn.norm_added_q.weight"),
    ("context_block.attn.ln_k.weight", "attn.norm_added_k.weight"),
    ("x_block.attn.ln_q.weight", "attn.norm_q.weight"),
    ("x_block.attn.ln_k.weight", "attn.norm_k.weight"),
    ("x_block.attn2.ln_q.weight", "attn2.norm_q.weight"),
    ("x_block.attn2.ln_k.weight", "attn2.norm_k.weight"),
]


def blocks(keys: Iterable[str], prefix: str = "joint_blocks") -> list[int]:
    return block_indices(keys, prefix)


def _pairs(keys: Iterable[str], layout: str) -> list[tuple[str, list[str], bool]]:
    """(original key, [diffusers keys], swapped halves) for every tensor the block count implies."""
    found = blocks(keys, "joint_blocks" if layout == "original" else "transformer_blocks")
    last = found[-1] if found else -1
    out = [("pos_embed", ["pos_embed.pos_embed"], False)]

    def linear(orig: str, diff: list[str], swap: bool = False) -> None:
        out.extend((f"{orig}.{p}", [f"{d}.{p}" for d in diff], swap) for p in ("weight", "bias"))

    for orig, diff in _TOP:
        linear(orig, diff, swap=orig == FINAL_ADALN)
    for i in found:
        for orig, diff in _BLOCK:
            swap = i == last and orig == "context_block.adaLN_modulation.1"   # pre-only: (shift, scale)
            linear(f"joint_blocks.{i}.{orig}", [f"transformer_blocks.{i}.{d}" for d in diff], swap)
        out.extend((f"joint_blocks.{i}.{o}", [f"transformer_blocks.{i}.{d}"], False) for o, d in _NORMS)
    return out


def fused_on_load(key: str) -> bool:
    """Whether the diffusers tensor ``key`` becomes part of a new one (fused q, k, v; swapped
    adaLN halves); ``load_model(copied=...)`` reads those into memory instead of mapping them."""
    return key.startswith(("norm_out.linear.", "transformer_blocks.")) and (
        re.search(r"\.(to_[qkv]|add_[qkv]_proj|norm1_context\.linear)\.", key) is not None)


def diffusers_to_original(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``SD3Transformer2DModel`` keys -> the original's (fusing q, k, v)."""
    out = {}
    for orig, diff, swap in _pairs(sd, "diffusers"):
        if all(d in sd for d in diff):
            parts = [sd.pop(d) for d in diff]
            t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            out[orig] = swap_halves(t) if swap else t
    out.update(sd)  # unknown keys travel on, to be reported by the loader
    sd.clear()
    return out


def original_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The original keys -> diffusers ``SD3Transformer2DModel`` keys (splitting ``qkv``)."""
    out = {}
    for orig, diff, swap in _pairs(sd, "original"):
        if orig not in sd:
            continue
        t = sd.pop(orig)
        t = swap_halves(t) if swap else t
        if len(diff) == 1:
            out[diff[0]] = t
            continue
        if t.shape[0] % 3:
            raise CheckpointError(f"{orig} has {t.shape[0]} rows; expected q, k and v of equal width (3 x hidden)")
        out.update(zip(diff, t.chunk(3, dim=0)))
    out.update(sd)
    sd.clear()
    return out


def strip_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """An all-in-one file (``model.diffusion_model.*`` beside ``first_stage_model.*`` and
    ``text_encoders.*``) -> the MMDiT's original keys; the other parts are not the transformer's."""
    return _strip(sd, (PREFIX,))


# (what the file is, key prefixes or names only it has); checked in order on keys without their
# all-in-one prefix
_FOREIGN = (
    ("a FLUX.2 transformer (double_stream_modulation_img.*): load it with the flux2 family",
     ("double_stream_modulation_img.", "single_stream_modulation.")),
    ("a FLUX.1 transformer in BFL layout (double_blocks.*): load it with the flux1 family",
     ("double_blocks.", "img_in.")),
    ("a FLUX transformer in diffusers layout (single_transformer_blocks.*): load it with the flux1 or flux2 family",
     ("single_transformer_blocks.", "x_embedder.weight")),
    ("an SDXL UNet (input_blocks.* with label_emb.*, the original layout)", ("label_emb.",)),
    ("an SDXL UNet (down_blocks.* with add_embedding.*, the diffusers layout)", ("add_embedding.",)),
    ("a Stable Diffusion 1.x / 2.x UNet (input_blocks.*)", ("input_blocks.",)),
    ("a Stable Diffusion UNet (down_blocks.*, the diffusers layout)", ("down_blocks.", "conv_in.weight")),
    ("a DiT (blocks.*)", ("blocks.", "y_embedder.embedding_table.")),
    ("an autoencoder (set it as vae)", ("encoder.down.", "encoder.down_blocks.", "decoder.up.", "decoder.up_blocks.")),
    ("a T5 text encoder", ("encoder.block.", "shared.weight")),
    ("a CLIP text encoder", ("text_model.",)),
)


def identify_foreign(keys: Iterable[str]) -> str | None:
    """What a checkpoint that is not an SD3 MMDiT looks like, from its keys (None: it may be one)."""
    keys = list(keys)
    if any(k.startswith(PREFIX) for k in keys):
        keys = [k[len(PREFIX):] for k in keys if k.startswith(PREFIX)]
    for what, markers in _FOREIGN:
        if any(k.startswith(markers) for k in keys):
            return what
    return None


def detect_layout(keys: Iterable[str]) -> str:
    """``"original"``, ``"diffusers"`` or ``"single-file"`` (``model.diffusion_model.*``)."""
    keys = set(keys)
    foreign = identify_foreign(keys)
    if foreign is not None:
        raise CheckpointError(f"not an SD3 / SD3.5 MMDiT: the keys are those of {foreign}")
    if any(k.startswith(PREFIX) for k in keys):
        return "single-file"
    if "x_embedder.proj.weight" in keys or any(k.startswith("joint_blocks.") for k in keys):
        return "original"
    if "pos_embed.proj.weight" in keys or any(k.startswith("transformer_blocks.") for k in keys):
        return "diffusers"
    raise CheckpointError("not an SD3 / SD3.5 MMDiT checkpoint: none of x_embedder.proj.weight (original), "
                          f"pos_embed.proj.weight (diffusers) or {PREFIX}* (single file) is present; "
                          f"first keys: {', '.join(sorted(keys)[:5])}")


def check_not_scaled(keys: Iterable[str]) -> None:
    """ComfyUI's scaled-fp8 files store per-tensor scales beside the weights. Loading a model reads
    them (``load_model`` takes the scales out before converting); a key conversion alone refuses
    them, as its output would lose the scales."""
    scaled = [k for k in keys if k.endswith((".scale_weight", ".weight_scale", "scaled_fp8"))]
    if scaled:
        raise CheckpointError(f"a scaled-fp8 file (ComfyUI's per-tensor scales, e.g. {scaled[0]}): its keys cannot "
                              f"be converted without its values; load it as a model, or convert a bf16 file")


def to_original(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Any supported layout -> the original (the ``rename`` given to ``load_model``)."""
    layout = detect_layout(sd)
    check_not_scaled(sd)
    if layout == "single-file":
        return strip_prefix(sd)
    return diffusers_to_original(sd) if layout == "diffusers" else sd


def infer_params(shapes: Mapping[str, tuple[int, ...]], num_heads: int | None = None) -> SD3Params:
    """``SD3Params`` from tensor shapes in any layout. Without qk-norm weights the head count is
    not in the file: ``num_heads``, else the reference's rule (head dim 64). The positional
    table's init grid (``pos_embed_base``) is not stored either: 64 as in every release."""
    sd = to_original(meta_state(shapes))
    try:
        hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
        table = sd["pos_embed"].shape[1]
        mlp_hidden = sd["joint_blocks.0.x_block.mlp.fc1.weight"].shape[0]
        out_features = sd["final_layer.linear.weight"].shape[0]
        pooled, context = sd["y_embedder.mlp.0.weight"].shape[1], sd["context_embedder.weight"].shape[1]
    except KeyError as exc:
        raise CheckpointError(f"not a complete SD3 MMDiT: {exc.args[0]} is missing") from None
    size = round(table ** 0.5)
    if size * size != table:
        raise CheckpointError(f"pos_embed has {table} rows, not a square table (max x max)")
    ln_q = sd.get("joint_blocks.0.x_block.attn.ln_q.weight")
    if ln_q is not None:
        num_heads = hidden // ln_q.shape[0]
    depth = len(blocks(sd))
    dual = tuple(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in sd)
    return SD3Params(in_channels=in_channels, out_channels=out_features // (patch * patch), patch_size=patch,
                     context_in_dim=context, pooled_dim=pooled, hidden_size=hidden,
                     num_heads=num_heads or hidden // 64, depth=depth, mlp_ratio=mlp_hidden / hidden,
                     pos_embed_max_size=size, qk_norm=ln_q is not None, dual_attention_layers=dual)


def _shapes_only(params: SD3Params) -> SD3Params:
    """What the tensors of a checkpoint pin down (no init grid; the heads only through qk-norm)."""
    return attrs.evolve(params, pos_embed_base=64, num_heads=params.num_heads if params.qk_norm else 0)


def detect_variant(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The first ``VARIANTS`` row whose shapes match; SD3.5-large-turbo has large's shapes, so it
    is only reached by naming it."""
    found = _shapes_only(infer_params(shapes))
    for name, params in VARIANTS.items():
        if _shapes_only(params) == found:
            return name
    medium = VARIANTS["sd3-medium"]
    differs = {f.name: getattr(found, f.name) for f in attrs.fields(SD3Params)
               if f.name != "num_heads" and getattr(found, f.name) != getattr(medium, f.name)}
    raise CheckpointError(f"SD3 weights of no known variant ({', '.join(VARIANTS)}); they differ from sd3-medium in "
                          f"{differs}")


def diffusers_modules(modules: Iterable[str]) -> list[tuple[str, str]]:
    """(diffusers module name, ours) for each of our ``modules`` that diffusers has, read off the
    tables above; a fused ``qkv`` appears once per part (``x_block.attn.qkv`` as ``attn.to_q``,
    ``attn.to_k`` and ``attn.to_v``). LoRA target patterns in diffusers' naming match against these."""
    wanted = set(modules)
    rows = [(d, o) for o, diff in _TOP for d in diff]
    for i in blocks(wanted):
        rows += [(f"transformer_blocks.{i}.{d}", f"joint_blocks.{i}.{o}") for o, diff in _BLOCK for d in diff]
    return [(d, o) for d, o in rows if o in wanted]
