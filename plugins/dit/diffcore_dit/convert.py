"""diffusers ``DiTTransformer2DModel`` weights -> ours.

diffusers keeps one timestep/class embedder per block (``transformer_blocks.N.norm1.emb``), all
copies of the original DiT's single shared embedder; ours is shared, so conversion takes block 0's
and checks the others are equal. Separate to_q/to_k/to_v become one fused ``qkv``.

Two documented differences from a stock diffusers config: diffusers' MLP LayerNorm uses its
``norm_eps`` (default 1e-5) where DiT uses 1e-6 (pass ``norm_eps=1e-6`` for exact parity, see
``diffusers_config``), and a learned-sigma output (2 * C channels) keeps its first C channels.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from diffcore.api import CheckpointError, load_state_dict
from diffcore_dit.params import DiTParams

EMB = "transformer_blocks.{}.norm1.emb."
_SHARED = {
    "timestep_embedder.linear_1": "t_embed.0",
    "timestep_embedder.linear_2": "t_embed.2",
    "class_embedder.embedding_table": "y_embed",
}
_BLOCK = {
    "norm1.linear": "modulation",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.0",
    "ff.net.2": "mlp.2",
}
_TOP = {
    "pos_embed.proj": "patch_embed",
    "proj_out_1": "final.modulation",
    "proj_out_2": "final.linear",
}


def is_diffusers(state_dict: dict[str, Any]) -> bool:
    return any(k.startswith("transformer_blocks.") for k in state_dict)


def from_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers DiT state dict to ``DiT2D``'s keys (raises ``CheckpointError`` on leftovers)."""
    sd = dict(state_dict)
    sd.pop("pos_embed.pos_embed", None)  # fixed sine-cosine table, rebuilt by the model
    out: dict[str, Tensor] = {}
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"transformer_blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise CheckpointError("not a diffusers DiT state dict: no transformer_blocks.N.* keys")

    for src, dst in _SHARED.items():
        for kind in ("weight", "bias"):
            first = sd.pop(f"{EMB.format(0)}{src}.{kind}", None)
            if first is None:
                continue
            out[f"{dst}.{kind}"] = first
            for i in range(1, depth):
                other = sd.pop(f"{EMB.format(i)}{src}.{kind}", None)
                if other is not None and not other.is_meta and not torch.equal(other, first):
                    raise CheckpointError(
                        f"diffusers DiT block {i} has its own {src}.{kind} (max difference "
                        f"{(other - first).abs().max().item():.3g} from block 0); DiT shares one embedder, "
                        f"so this checkpoint cannot be converted")

    for i in range(depth):
        pre = f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd.pop(f"{pre}attn1.to_{n}.{kind}", None) for n in "qkv"]
            if all(t is not None for t in qkv):
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(qkv, dim=0)
            for src, dst in _BLOCK.items():
                if (t := sd.pop(f"{pre}{src}.{kind}", None)) is not None:
                    out[f"blocks.{i}.{dst}.{kind}"] = t

    for src, dst in _TOP.items():
        for kind in ("weight", "bias"):
            if (t := sd.pop(f"{src}.{kind}", None)) is not None:
                out[f"{dst}.{kind}"] = t

    conv, final = out.get("patch_embed.weight"), out.get("final.linear.weight")
    in_channels, patch = (conv.shape[1], conv.shape[2]) if conv is not None else (0, 0)
    if final is not None and final.shape[0] == 2 * patch * patch * in_channels:  # learned sigma: keep the mean
        for kind in ("weight", "bias"):
            t = rearrange(out[f"final.linear.{kind}"], "(p q two c) ... -> two (p q c) ...", p=patch, q=patch, two=2)
            out[f"final.linear.{kind}"] = t[0].contiguous()

    if sd:
        raise CheckpointError(f"diffusers DiT state dict has {len(sd)} keys with no DiT2D counterpart: "
                              f"{', '.join(sorted(sd)[:8])}")
    return out


def params_from_diffusers(config: dict[str, Any]) -> DiTParams:
    """``DiTParams`` for a diffusers ``DiTTransformer2DModel`` config dict."""
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    return DiTParams(hidden=heads * head_dim, depth=config["num_layers"], heads=heads,
                     patch=config["patch_size"], in_channels=config["in_channels"],
                     image_size=config["sample_size"], num_classes=config["num_embeds_ada_norm"])


def diffusers_config(params: DiTParams) -> dict[str, Any]:
    """Keyword arguments of a diffusers ``DiTTransformer2DModel`` with the same shape (and DiT's eps)."""
    if params.mlp_ratio != 4.0:
        raise ValueError(f"diffusers' DiT has a fixed MLP ratio of 4, these params have {params.mlp_ratio}")
    return dict(num_attention_heads=params.heads, attention_head_dim=params.hidden // params.heads,
                in_channels=params.in_channels, out_channels=params.in_channels, num_layers=params.depth,
                sample_size=params.image_size, patch_size=params.patch, num_embeds_ada_norm=params.num_classes,
                activation_fn="gelu-approximate", norm_type="ada_norm_zero", norm_elementwise_affine=False,
                norm_eps=1e-6)


def checkpoint_file(path: str | Path) -> Path:
    """A safetensors file, a training checkpoint folder's ``ema.safetensors`` (else
    ``model.safetensors``), or a training run's folder (its newest checkpoint)."""
    path = Path(path)
    if path.is_dir() and not any((path / n).is_file() for n in ("ema.safetensors", "model.safetensors")):
        steps = sorted(p for p in [*path.glob("step-*"), *path.glob("checkpoints/step-*")]
                       if p.is_dir() and not p.name.endswith(".tmp"))
        if steps:
            path = max(steps, key=lambda p: p.name)
    if path.is_dir():
        for name in ("ema.safetensors", "model.safetensors"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"checkpoint folder {path} has neither ema.safetensors nor model.safetensors")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def load_weights(network: torch.nn.Module, path: str | Path) -> Path:
    """Load our or diffusers' DiT weights into ``network`` (all keys, same shapes); returns the file
    read. The core's reader checks the file (empty, truncated, not safetensors, unsafe pickle)."""
    file = checkpoint_file(path)
    sd = load_state_dict(file)
    if is_diffusers(sd):
        sd = from_diffusers(sd)
    own = network.state_dict()
    if not own.keys() & sd.keys():
        raise CheckpointError(f"{file}: not a DiT checkpoint: none of its {len(sd)} tensors has a DiT2D name "
                              f"(first: {', '.join(sorted(sd)[:4]) or 'none'}); is it another model family's file?")
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    wrong = [f"{k} {tuple(sd[k].shape)} (model: {tuple(own[k].shape)})"
             for k in own.keys() & sd.keys() if sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"missing {', '.join(missing[:6])}" if missing else "",
                 f"unexpected {', '.join(unexpected[:6])}" if unexpected else "",
                 f"shape mismatch {'; '.join(sorted(wrong)[:6])}" if wrong else ""]
        raise CheckpointError(f"{file} does not fit this DiT ({getattr(network, 'params', '')}): "
                              + "; ".join(p for p in parts if p))
    network.load_state_dict(sd)
    return file
