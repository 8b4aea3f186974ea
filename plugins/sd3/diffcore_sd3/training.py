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


ATTENTION = ["joint_blocks.*.*_block.attn*.qkv", "joint_blocks.*.*_block.attn*.proj"]
LORA_PRESETS = {
    "attention": ATTENTION,
    "attention-mlp": [*ATTENTION, "joint_blocks.*.*_block.mlp.fc*"],
    "all-linear": ["*"],
}
