"""Gradient checkpointing of a network's blocks: activations recomputed in backward instead of
stored, trading about a third more compute for memory that no longer grows with depth."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffcore.nn.lora_linear import keeping_activations


def run_block(block: nn.Module, *args: Any, checkpointing: bool = False) -> Any:
    """``block(*args)``, checkpointed when ``checkpointing`` is on and gradients are being recorded
    (sampling under ``no_grad`` runs plainly). A checkpointed block recomputes everything, so its
    LoRA layers do not recompute their activations a second time (``diffcore.nn.lora_linear``)."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(_keeping_activations, block, *args, use_reentrant=False)
    return block(*args)


def _keeping_activations(block: nn.Module, *args: Any) -> Any:
    # in the forward pass and in its recomputation alike, so both save the same tensors
    with keeping_activations():
        return block(*args)
