"""klein-9b-kv's reference cache: the keys and values of the reference tokens, kept from the
first step and spliced into every attention layer after it (``ReferenceSpan`` is a block's
``kv`` hook, see ``diffcore.nn.mmdit``).
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor


@attrs.define(eq=False)
class ReferenceCache:
    """Every attention layer's keys and values of the reference tokens, kept from the first
    forward that sees them (FLUX.2 klein-9b-kv): later forwards splice them in after the text
    instead of running the references through the model again. The references attend only to
    each other, at a fixed timestep, so their keys and values are the same at every step.
    One per generation (and per guidance branch); ``clear()`` empties it."""

    kv: dict[str, tuple[Tensor, Tensor]] = attrs.field(factory=dict)

    @property
    def filled(self) -> bool:
        return bool(self.kv)

    def clear(self) -> None:
        self.kv.clear()


@attrs.frozen
class ReferenceSpan:
    """One layer's view of a ``ReferenceCache`` in one forward. Its sequence starts with ``txt``
    text tokens. Filling (``mask`` given): ``refs`` reference tokens follow the text; their keys
    and values are stored and ``mask`` (True = may attend) keeps them attending to each other
    only. Reading (``mask`` None): the stored keys and values are spliced in after the text."""

    cache: ReferenceCache
    layer: str
    txt: int
    refs: int = 0
    mask: Tensor | None = None

    def __call__(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """k, v (batch, heads, tokens, head_dim) -> the keys, values and mask to attend with."""
        if self.mask is not None:
            span = slice(self.txt, self.txt + self.refs)
            self.cache.kv[self.layer] = (k[:, :, span].clone(), v[:, :, span].clone())
            return k, v, self.mask
        k_ref, v_ref = self.cache.kv[self.layer]
        if k_ref.shape[0] != k.shape[0]:
            raise ValueError(f"the reference cache was filled for a batch of {k_ref.shape[0]}, this forward has "
                             f"{k.shape[0]}: use one cache per batch layout")
        txt = self.txt
        return (torch.cat([k[:, :, :txt], k_ref, k[:, :, txt:]], dim=2),
                torch.cat([v[:, :, :txt], v_ref, v[:, :, txt:]], dim=2), None)
