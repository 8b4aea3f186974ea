"""SDXL training helpers: LoRA target presets and diffusers module names.

Presets (``fnmatch`` patterns over ``UNet.named_modules()``):

- ``attention``: every transformer block's self- and cross-attention ``to_q`` / ``to_k`` /
  ``to_v`` / ``to_out.0``: diffusers' train_dreambooth_lora_sdxl default;
- ``attention-mlp``: the above and the GEGLU feed-forwards (``ff.net.0.proj``, ``ff.net.2``);
- ``all-linear``: every linear layer (time and label embeddings, ResBlocks' embedding
  projections, the transformers' ``proj_in`` / ``proj_out`` too).
"""

from __future__ import annotations

from collections.abc import Iterable

ATTENTION = [f"*.attn{i}.{name}" for i in (1, 2) for name in ("to_q", "to_k", "to_v", "to_out.0")]
LORA_PRESETS = {
    "attention": ATTENTION,
    "attention-mlp": [*ATTENTION, "*.ff.net.0.proj", "*.ff.net.2"],
    "all-linear": ["*"],
}


def diffusers_modules(modules: Iterable[str], params) -> list[tuple[str, str]]:
    """(diffusers ``UNet2DConditionModel`` module name, ours) for each of our ``modules``: the
    key conversion's prefix table (``input_blocks.4.1`` = ``down_blocks.1.attentions.0``, ResBlock
    layers renamed: ``emb_layers.1`` = ``time_emb_proj``); LoRA target patterns in diffusers'
    naming match against these."""
    from diffcore_sdxl.convert import RESNET, Structure, prefix_pairs

    s = Structure(len(params.channel_mult), params.num_res_blocks, tuple(d > 0 for d in params.transformer_depth))
    table = {ours: (theirs, resnet) for ours, theirs, resnet in prefix_pairs(s)}
    out = []
    for name in modules:
        parts = name.split(".")
        for k in range(min(5, len(parts)), 0, -1):
            prefix = ".".join(parts[:k])
            if prefix in table:
                theirs, resnet = table[prefix]
                rest = ".".join(parts[k:])
                if resnet:
                    rest = RESNET.get(rest)
                    if rest is None:
                        break
                out.append((f"{theirs}.{rest}" if rest else theirs, name))
                break
    return out
