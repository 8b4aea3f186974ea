"""The attention operation every model family calls, and the small mechanism that patches it.

Model code computes q, k, v its own way and calls an ``Attention`` module for the softmax part.
Attention-level guidance (PAG, NAG, ...) never touches the blocks: within ``patch_attention``
the named ``Attention`` modules run a patch on chosen rows of the batch (one guidance branch)
and plain scaled-dot-product attention on the others.

Two extensions keep guidance methods that work *inside* a branch cheap and general:

- several patches on the same rows of a layer compose: each later patch receives the earlier
  one as its ``attend`` (so NAG-PAG on ``cond`` and another patch on ``cond`` both apply);
- a patch may see the q, k, v of *other* rows of the same forward (``context=``): NAG reads the
  negative branch's keys and values while it rewrites the positive rows, with no extra forward.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from diffcore.errors import ConfigError, did_you_mean

# patch(q, k, v, attend) -> out; q, k, v are (batch, heads, tokens, head_dim) for the patched rows,
# ``attend`` is the unpatched attention (or the previous patch on these rows) so a patch can call
# it (NAG needs both outputs). A patch entered with ``context=`` also gets ``context=AttentionContext``.
AttentionPatch = Callable[..., torch.Tensor]


class AttentionContext(NamedTuple):
    """Another branch's rows of the same forward, as a ``context=`` patch sees them: its q, k, v
    and ``attend`` (plain attention under that branch's own mask)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


Route = tuple[slice, AttentionPatch, "slice | None"]


class Attention(nn.Module):
    """softmax(q k^T / sqrt(d)) v over (batch, heads, tokens, head_dim); patchable by name."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: list[Route] = []

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.routes:
            return attend(q, k, v, mask)
        chains: dict[tuple[int, int, int], list[Route]] = {}
        for route in self.routes:
            chains.setdefault(route[0].indices(q.shape[0]), []).append(route)
        covered = {i for key in chains for i in range(*key)}
        if len(covered) == q.shape[0]:   # every row is patched: plain attention would be thrown away
            out = q.new_empty(*q.shape[:-1], v.shape[-1])
        else:
            out = attend(q, k, v, mask).clone()
        for chain in chains.values():
            rows = chain[0][0]
            inner = functools.partial(attend, mask=_rows(mask, rows))
            for _, patch, context in chain:
                ctx = None if context is None else AttentionContext(
                    q[context], k[context], v[context], functools.partial(attend, mask=_rows(mask, context)))
                inner = _bind(patch, inner, ctx)
            out[rows] = inner(q[rows], k[rows], v[rows])
        return out


def _rows(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """The mask of some batch rows (a mask broadcast over the batch applies to all of them)."""
    return mask[rows] if mask is not None and mask.ndim == 4 and mask.shape[0] > 1 else mask


def _bind(patch: AttentionPatch, inner: Callable[..., torch.Tensor],
          context: AttentionContext | None) -> Callable[..., torch.Tensor]:
    if context is None:
        return lambda q, k, v: patch(q, k, v, inner)
    return lambda q, k, v: patch(q, k, v, inner, context=context)


def attention_layers(model: nn.Module) -> dict[str, Attention]:
    """Named attention layers: the module path of each ``Attention``'s parent (``blocks.3.attn``)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            layers[name.rsplit(".", 1)[0] if "." in name else name] = module
    return layers


def resolve_layers(model: nn.Module, names: list[str], aliases: Callable[[str], str] | None = None) -> dict[str, Attention]:
    """Map user-given layer names (or a family's aliases) to modules; unknown names are an error.

    A name with ``*``, ``?`` or ``[`` is a shell-style pattern over the model's own layer names
    (``"*"`` is every layer, ``"blocks.1?.attn"`` blocks 10 to 19); it must match at least one."""
    layers = attention_layers(model)
    found = {}
    for name in names:
        if any(c in name for c in "*?["):
            matched = [layer for layer in layers if fnmatch.fnmatchcase(layer, name)]
            if not matched:
                raise ConfigError(f"attention layer pattern {name!r} matches no layer; "
                                  f"this model has: {', '.join(_compact(layers))}")
            found.update((layer, layers[layer]) for layer in matched)
            continue
        key = aliases(name) if aliases else name
        if key not in layers:
            listing = ", ".join(_compact(layers))
            raise ConfigError(f"unknown attention layer {name!r}{did_you_mean(key, layers)}; "
                              f"this model has: {listing}")
        found[name] = layers[key]
    return found


@contextlib.contextmanager
def patch_attention(layers: Mapping[str, Attention], rows: slice, patch: AttentionPatch,
                    context: slice | None = None) -> Iterator[None]:
    """Within the block, ``layers`` apply ``patch`` to the batch rows ``rows``.

    Patches on the same rows of a layer compose in the order they were entered: each receives
    the previous one as ``attend``. With ``context`` (other rows of the same batch), the patch is
    called as ``patch(q, k, v, attend, context=AttentionContext(...))`` with those rows' q, k, v."""
    route = (rows, patch, context)
    unique = {id(layer): layer for layer in layers.values()}.values()   # two names of one layer patch it once
    for layer in unique:
        layer.routes.append(route)
    try:
        yield
    finally:
        for layer in unique:
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
