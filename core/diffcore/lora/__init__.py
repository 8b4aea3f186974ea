"""LoRA files: read, written and applied for inference (``files``, ``apply``); the ``lora``
trainer that makes them is ``diffcore.training.lora``."""

from diffcore.lora.apply import LoraLinear, apply_lora, unmerge_lora
from diffcore.lora.files import FORMATS, LoraLayer, LoraWeights, detect_format, load_lora, read_tensors, save_lora

__all__ = ["FORMATS", "LoraLayer", "LoraLinear", "LoraWeights", "apply_lora", "detect_format", "load_lora",
           "read_tensors", "save_lora", "unmerge_lora"]
