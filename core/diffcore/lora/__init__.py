"""LoRA files in the formats people trade, read into one in-memory form and applied for inference.

``weights``: ``LoraLayer`` / ``LoraWeights`` and the exact fuse / split of q, k, v parts;
``formats``: the key patterns of each format (no torch); ``files``: ``load_lora`` / ``save_lora``;
``apply``: ``apply_lora`` (merged into the weights, or as a forward hook that stacks).
"""

from diffcore.lora.formats import FORMATS
from diffcore.lora.weights import LoraLayer, LoraWeights

__all__ = ["FORMATS", "LoraLayer", "LoraWeights", "load_lora", "save_lora", "apply_lora", "apply_lora_to_bundle",
           "remove_lora",
           "read_lora", "match_lora"]


def __getattr__(name):
    if name in ("load_lora", "save_lora", "read_lora", "match_lora"):
        from diffcore.lora import files
        return getattr(files, name)
    if name in ("apply_lora", "apply_lora_to_bundle", "remove_lora"):
        from diffcore.lora import apply
        return getattr(apply, name)
    raise AttributeError(name)
