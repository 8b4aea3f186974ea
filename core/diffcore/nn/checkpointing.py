"""Gradient checkpointing of a network's blocks: activations recomputed in backward instead of
stored, trading about a third more compute for memory that no longer grows with depth."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_block(block: nn.Module, *args: Any, checkpointing: bool = False) -> Any:
    """``block(*args)``, checkpointed when ``checkpointing`` is on and gradients are being recorded
    (sampling under ``no_grad`` runs plainly)."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)
