"""SD3 training helpers: LoRA target presets and diffusers module names.

Presets (``fnmatch`` patterns over ``MMDiT.named_modules()``; ``attn*`` takes in SD3.5-medium's
second image attention ``attn2`` where a block has one):

- ``attention``: both streams' fused ``qkv`` and output ``proj``: diffusers'
  train_dreambooth_lora_sd3 default (``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0`` and the
  context stream's ``add_*_proj`` / ``to_add_out``), plus ``attn2``'s.
- ``attention-mlp``: the above and both streams' MLPs (``ff`` / ``ff_context``).
- ``all-linear``: every linear layer: the adaLN modulations, embedders and final layer too.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from diffcore_sd3.convert import diffusers_modules

ATTENTION = ["joint_blocks.*.*_block.attn*.qkv", "joint_blocks.*.*_block.attn*.proj"]
LORA_PRESETS = {
    "attention": ATTENTION,
    "attention-mlp": [*ATTENTION, "joint_blocks.*.*_block.mlp.fc*"],
    "all-linear": ["*"],
}


def lora_patterns(network: nn.Module, pattern: str) -> list[str]:
    """Patterns over ``network``'s module names for a user's ``pattern``: in our naming as it is or
    (peft's rule) as the last dotted parts of a name; in diffusers' naming (a leading
    ``transformer.`` allowed), our layers whose diffusers name it matches the same two ways
    (``to_q`` -> every ``x_block.attn.qkv`` and ``attn2.qkv``; ``add_k_proj`` -> ``context_block.attn.qkv``)."""
    linears = [n for n, m in network.named_modules() if isinstance(m, nn.Linear)]
    bare = pattern.removeprefix("transformer.")
    matches = [pattern, f"*.{pattern}", bare, f"*.{bare}"]
    found = {ours: None for theirs, ours in diffusers_modules(linears) if any(fnmatchcase(theirs, p) for p in matches)}
    return [*dict.fromkeys(matches), *found]
