"""FLUX.2 training helpers: LoRA target presets and diffusers module names.

Presets (``fnmatch`` patterns over ``Flux2.named_modules()``); FLUX.2's blocks hold no
modulation weights, so the blocks' linears are attention and MLP only:

- ``attention``: both streams' fused ``qkv`` and output ``proj`` in the double blocks, and the
  single blocks' ``linear1`` (q, k, v fused with the MLP's gate and up projections: the only way
  into their attention). diffusers' ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0``,
  ``add_*_proj`` / ``to_add_out`` and ``to_qkv_mlp_proj`` land here.
- ``attention-mlp``: the above, the double blocks' SwiGLU MLPs (``ff`` / ``ff_context``) and the
  single blocks' ``linear2`` (diffusers' ``attn.to_out``): every linear layer of the blocks. This
  is diffusers' train_dreambooth_lora_flux2(_klein) default list plus the text stream and MLPs.
- ``all-linear``: every linear layer: the embedders, the shared modulations and the final layer too.
"""

from __future__ import annotations


ATTENTION = ["double_blocks.*.img_attn.qkv", "double_blocks.*.img_attn.proj", "double_blocks.*.txt_attn.qkv",
             "double_blocks.*.txt_attn.proj", "single_blocks.*.linear1"]
LORA_PRESETS = {
    "attention": ATTENTION,
    "attention-mlp": [*ATTENTION, "double_blocks.*.img_mlp.*", "double_blocks.*.txt_mlp.*", "single_blocks.*.linear2"],
    "all-linear": ["*"],
}
