"""SDXL training helpers: LoRA target presets (diffusers module names: ``convert.diffusers_modules``).

Presets (``fnmatch`` patterns over ``UNet.named_modules()``):

- ``attention``: every transformer block's self- and cross-attention ``to_q`` / ``to_k`` /
  ``to_v`` / ``to_out.0``: diffusers' train_dreambooth_lora_sdxl default;
- ``attention-mlp``: the above and the GEGLU feed-forwards (``ff.net.0.proj``, ``ff.net.2``);
- ``all-linear``: every linear layer (time and label embeddings, ResBlocks' embedding
  projections, the transformers' ``proj_in`` / ``proj_out`` too).
"""

from __future__ import annotations

ATTENTION = [f"*.attn{i}.{name}" for i in (1, 2) for name in ("to_q", "to_k", "to_v", "to_out.0")]
LORA_PRESETS = {
    "attention": ATTENTION,
    "attention-mlp": [*ATTENTION, "*.ff.net.0.proj", "*.ff.net.2"],
    "all-linear": ["*"],
}

