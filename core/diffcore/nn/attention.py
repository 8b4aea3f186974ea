"""The attention operation every model family calls, and the small mechanism that patches it.

Model code computes q, k, v its own way and calls an ``Attention`` module for the softmax part.
Attention-level guidance (PAG, NAG, ...) never touches the blocks: within ``patch_attention``
the named ``Attention`` modules run a patch on chosen rows of the batch (one guidance branch)
and plain scaled-dot-product attention on the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.errors import ConfigError, did_you_mean

# patch(q, k, v, attend) -> out; q, k, v are (batch, heads, tokens, head_dim) for the patched rows,
# ``attend`` is the unpatched attention so a patch can call it (NAG needs both outputs).
AttentionPatch = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]], torch.Tensor]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    """softmax(q k^T / sqrt(d)) v over (batch, heads, tokens, head_dim); patchable by name."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: list[tuple[slice, AttentionPatch]] = []

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        out = attend(q, k, v, mask)
        if not self.routes:
            return out
        out = out.clone()
        for rows, patch in self.routes:
            m = mask[rows] if mask is not None and mask.shape[0] > 1 else mask
            out[rows] = patch(q[rows], k[rows], v[rows], lambda q, k, v: attend(q, k, v, m))
        return out


def attention_layers(model: nn.Module) -> dict[str, Attention]:
    """Named attention layers: the module path of each ``Attention``'s parent (``blocks.3.attn``)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            layers[name.rsplit(".", 1)[0] if "." in name else name] = module
    return layers


def resolve_layers(model: nn.Module, names: list[str], aliases: Callable[[str], str] | None = None) -> dict[str, Attention]:
    """Map user-given layer names (or a family's aliases) to modules; unknown names are an error."""
    layers = attention_layers(model)
    found = {}
    for name in names:
        key = aliases(name) if aliases else name
        if key not in layers:
            listing = ", ".join(_compact(layers))
            raise ConfigError(f"unknown attention layer {name!r}{did_you_mean(key, layers)}; "
                              f"this model has: {listing}")
        found[name] = layers[key]
    return found


@contextlib.contextmanager
def patch_attention(layers: Mapping[str, Attention], rows: slice, patch: AttentionPatch) -> Iterator[None]:
    """Within the block, ``layers`` apply ``patch`` to the batch rows ``rows``."""
    route = (rows, patch)
    for layer in layers.values():
        layer.routes.append(route)
    try:
        yield
    finally:
        for layer in layers.values():
            layer.routes.remove(route)


def _compact(layers: Mapping[str, Attention]) -> list[str]:
    """``blocks.0.attn .. blocks.11.attn`` instead of twelve names."""
    import re

    groups: dict[tuple[str, str], list[int]] = {}
    others = []
    for name in layers:
        m = re.fullmatch(r"(.*?)(\d+)(.*)", name)
        if m:
            groups.setdefault((m.group(1), m.group(3)), []).append(int(m.group(2)))
        else:
            others.append(name)
    out = []
    for (pre, post), idx in groups.items():
        out.append(f"{pre}{min(idx)}{post} .. {pre}{max(idx)}{post}" if len(idx) > 1 else f"{pre}{idx[0]}{post}")
    return out + others
