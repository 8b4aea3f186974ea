"""The in-memory LoRA: per module of ours, ``down`` A (r, in), ``up`` B (out, r) and ``alpha``;
the layer's update is ``up @ down * alpha / r``.

Fusing: parts of one fused layer of ours (diffusers' separate ``to_q``, ``to_k``, ``to_v`` onto
FLUX's ``qkv``) become one LoRA of rank r_q + r_k + r_v: the A matrices stacked, B block-diagonal
with each part's ``alpha / r`` folded in, rows of a part the file lacks zero. The delta is the
parts' deltas stacked by rows, exactly. Splitting: each part takes the shared A and its rows of B;
columns of B that are zero in a part (the other parts' blocks after a fuse) are dropped, so a
fused-then-split LoRA has its original ranks again.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import attrs
import torch
from torch import Tensor


@attrs.define(eq=False)
class LoraLayer:
    down: Tensor       # A: (rank, in_features)
    up: Tensor         # B: (out_features, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> Tensor:
        """The weight update ``up @ down * alpha / r`` (out, in), in float32."""
        return (self.up.float() @ self.down.float()) * self.scale


@attrs.define(eq=False)
class LoraWeights(Mapping):
    """Module name of ours -> ``LoraLayer``; ``format``: the file's; ``text_encoders``: encoder
    prefix (``text_encoder``, ``text_encoder_2``) -> its module names -> ``LoraLayer``;
    ``not_applicable``: keys for text encoders this model does not have (or train)."""

    layers: dict[str, LoraLayer] = attrs.Factory(dict)
    format: str = "diffcore"
    not_applicable: list[str] = attrs.Factory(list)
    text_encoders: dict[str, dict[str, LoraLayer]] = attrs.Factory(dict)

    def __getitem__(self, name: str) -> LoraLayer:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def ranks(self) -> list[int]:
        """The network's layers' ranks (``text_ranks``: the text encoders')."""
        return sorted({layer.rank for layer in self.layers.values()})

    def text_ranks(self) -> list[int]:
        return sorted({layer.rank for layers in self.text_encoders.values() for layer in layers.values()})


def part_sizes(out_features: int, in_features: int, parts: int) -> list[int]:
    """Rows of each part of a fused layer: equal thirds for a q, k, v (3 parts); otherwise q, k, v
    are ``in_features`` wide each and the last part (an MLP's input, FLUX's ``linear1``) the rest."""
    if parts == 1:
        return [out_features]
    if parts <= 3 and out_features % parts == 0:
        return [out_features // parts] * parts
    rest = out_features - (parts - 1) * in_features
    if rest <= 0:
        raise ValueError(f"cannot split {out_features} rows into {parts} parts of a {in_features}-wide input")
    return [in_features] * (parts - 1) + [rest]


def fuse(parts: Sequence[LoraLayer | None], sizes: Sequence[int]) -> LoraLayer:
    """One LoRA on the fused layer from a LoRA (or None) per part, exact (module docstring)."""
    present = [(i, p) for i, p in enumerate(parts) if p is not None]
    if not present:
        raise ValueError("no part to fuse")
    if len(parts) == 1:
        return parts[0]
    down = torch.cat([p.down.float() for _, p in present])
    up = torch.zeros(sum(sizes), down.shape[0])
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    col = 0
    for i, p in present:
        up[offsets[i]:offsets[i] + sizes[i], col:col + p.rank] = p.up.float() * p.scale
        col += p.rank
    return LoraLayer(down=down, up=up, alpha=float(down.shape[0]))


def split(layer: LoraLayer, sizes: Sequence[int]) -> list[LoraLayer | None]:
    """The fused ``layer`` as one LoRA per part (None for a part it does not change), exact."""
    if len(sizes) == 1:
        return [layer]
    out: list[LoraLayer | None] = []
    for up in layer.up.float().split(list(sizes)):
        keep = up.abs().amax(dim=0) > 0
        if not keep.any():
            out.append(None)
            continue
        down = layer.down.float()[keep]
        out.append(LoraLayer(down=down.contiguous(), up=(up[:, keep] * layer.scale).contiguous(),
                             alpha=float(down.shape[0])))
    return out


def stack(layers: Sequence[LoraLayer]) -> LoraLayer:
    """Several LoRAs of one layer as one whose delta is their sum (ranks add)."""
    if len(layers) == 1:
        return layers[0]
    down = torch.cat([p.down.float() for p in layers])
    up = torch.cat([p.up.float() * p.scale for p in layers], dim=1)
    return LoraLayer(down=down, up=up, alpha=float(down.shape[0]))
