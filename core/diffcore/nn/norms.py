"""The normalisations of diffusion transformers: RMSNorm with a learnable scale, the per-head
QK-norm built from two of them, and the affine-free LayerNorm that adaLN modulates."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["QKNorm", "RMSNorm", "layer_norm"]


class RMSNorm(nn.Module):
    """RMS norm (Zhang & Sennrich 2019) computed in float32, with a learnable ``scale`` (BFL's key
    name; diffusers calls it ``weight``); eps 1e-6 as FLUX and SD3.5 use. On CPUs the input is
    cast to float32 first; on GPUs the fused kernel does that inside."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.scale)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            # on a GPU one fused kernel that accumulates in float32 itself: an explicit float32 copy
            # of q and k would move 3.5x the bytes (13 ms of a 1024^2 FLUX.1-dev forward on an H100)
            return F.rms_norm(x, self.scale.shape, self.scale.to(x.dtype), self.eps)
        return F.rms_norm(x.float(), self.scale.shape, self.scale.float(), self.eps).type_as(x)


class QKNorm(nn.Module):
    """Per-head RMS norm of queries and keys before attention (Dehghani et al. 2023), each with its
    own scale: ``norm(q, k) -> (q, k)`` for (..., head_dim) tensors, in their dtype."""

    def __init__(self, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.query_norm = RMSNorm(head_dim, eps)
        self.key_norm = RMSNorm(head_dim, eps)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q), self.key_norm(k)


def layer_norm(dim: int, eps: float = 1e-6) -> nn.LayerNorm:
    """LayerNorm without its own scale and bias: adaLN modulation supplies both (DiT, SD3, FLUX)."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=eps)

