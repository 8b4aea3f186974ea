"""Aspect-ratio buckets (NovelAI's bucketing, as kohya's ``make_bucket_resolutions``) and a batch
sampler that draws every global batch from one bucket.

A bucket is a (height, width) of about ``resolution^2`` pixels with both sides multiples of
``step`` in ``[min_side, max_side]``. An image goes to the bucket whose aspect ratio is nearest
(in log ratio, so 2:1 and 1:2 are equally far from 1:1), is resized to cover it and cropped.

``BucketBatches`` keeps ``ShuffledIndices``' promises: the stream is a function of the seed and
the position alone, rank ``r`` of ``world_size`` takes the ``r``-th contiguous share of every
global batch, and ``state_at(samples)`` is the exact resume point. Epoch ``e`` shuffles each
bucket's indices with ``Generator().manual_seed(seed + e)``, cuts them into global batches (the
last one of a bucket topped up from the start of the same bucket's order, so no batch is short
and none mixes sizes), then shuffles the order of the batches.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from diffcore.errors import ConfigError


def make_buckets(resolution: int, step: int = 64, min_side: int = 256, max_side: int = 2048) -> list[tuple[int, int]]:
    """(height, width) sizes of at most ``resolution^2`` pixels, sides multiples of ``step`` in
    ``[min_side, max_side]``, sorted; the square one always among them."""
    if step < 1 or min_side < step or max_side < min_side:
        raise ConfigError(f"bucket sides need 1 <= bucket_resolution_steps <= min_bucket_resolution <= "
                          f"max_bucket_resolution, got {step}, {min_side}, {max_side}", path="dataset")
    area = resolution * resolution
    lo, hi = -(-min_side // step) * step, max_side // step * step
    square = min(hi, max(lo, resolution // step * step))
    sizes = {(square, square)}
    for width in range(square + step, hi + 1, step):   # the wide half; each width takes the tallest height that fits
        height = min(width, area // width // step * step)
        if height < lo:
            break
        sizes.update({(height, width), (width, height)})
    return sorted(sizes)


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket with the nearest aspect ratio (log ratio; the first of equals)."""
    ratio = math.log(width / height)
    errors = [abs(ratio - math.log(w / h)) for h, w in buckets]
    return int(np.argmin(errors))


def cover_size(height: int, width: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """The (height, width) an image is resized to: the smallest that covers ``bucket``, aspect kept."""
    bh, bw = bucket
    scale = max(bh / height, bw / width)
    return max(bh, round(height * scale)), max(bw, round(width * scale))


class BucketBatches:
    """Infinite stream of this rank's micro batches, each a list of ``(index, visit_seed)`` keys of
    one bucket. ``visit_seed`` mixes (seed, epoch, index): the dataset draws a visit's flip, crop
    and tag order from it, so augmentations follow the sampler's state, never a global RNG.

    Use it as a DataLoader ``batch_sampler``; ``state_dict()`` is the same on every rank.
    """

    def __init__(self, buckets: Sequence[int], seed: int, rank: int = 0, world_size: int = 1,
                 batch_size: int | None = None):
        batch_size = world_size if batch_size is None else batch_size
        if len(buckets) < 1:
            raise ConfigError("cannot sample from an empty dataset (n=0)")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        if batch_size % world_size:
            raise ConfigError(f"global batch size {batch_size} is not divisible by world size {world_size}")
        self.n, self.seed, self.rank, self.world_size = len(buckets), seed, rank, world_size
        self.batch_size = batch_size
        members: dict[int, list[int]] = {}
        for i, b in enumerate(buckets):
            members.setdefault(int(b), []).append(i)
        self.members = [torch.tensor(members[b]) for b in sorted(members)]
        self.batches_per_epoch = sum(-(-len(m) // batch_size) for m in self.members)
        # which index is in which bucket: a resume onto another layout would replay other batches
        self.layout = hashlib.blake2b(np.asarray(buckets, dtype=np.int64).tobytes(), digest_size=8).hexdigest()
        self.epoch, self.position = 0, 0
        self._epoch: tuple[int, list[list[int]]] | None = None

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Epoch ``epoch``'s global batches, in order."""
        if self._epoch is None or self._epoch[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            batches: list[list[int]] = []
            for m in self.members:
                order = m[torch.randperm(len(m), generator=g)]
                count = -(-len(order) // self.batch_size)
                order = order.repeat(-(-count * self.batch_size // len(order)))[:count * self.batch_size]
                batches += order.view(count, self.batch_size).tolist()
            self._epoch = (epoch, [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()])
        return self._epoch[1]

    def next_global_batch(self) -> list[tuple[int, int]]:
        """The next global batch of keys (what every rank advances by)."""
        batch = self.epoch_batches(self.epoch)[self.position]
        keys = [(i, visit_seed(self.seed, self.epoch, i)) for i in batch]
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return keys

    def next_batch(self) -> list[tuple[int, int]]:
        """This rank's contiguous share of the next global batch."""
        size = self.local_batch_size
        return self.next_global_batch()[self.rank * size:(self.rank + 1) * size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        while True:
            yield self.next_batch()

    def state_at(self, samples: int) -> dict[str, int | str]:
        """The state after ``samples`` global samples (whole global batches)."""
        if samples % self.batch_size:
            raise ValueError(f"{samples} samples is not a whole number of batches of {self.batch_size}")
        batches = samples // self.batch_size
        return self._state(batches // self.batches_per_epoch, batches % self.batches_per_epoch)

    def state_dict(self) -> dict[str, int | str]:
        return self._state(self.epoch, self.position)

    def _state(self, epoch: int, position: int) -> dict[str, int | str]:
        return {"epoch": epoch, "position": position, "n": self.n, "seed": self.seed,
                "batches_per_epoch": self.batches_per_epoch, "batch_size": self.batch_size, "layout": self.layout}

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        mine = self.state_dict()
        keys = ("n", "seed", "batch_size", "batches_per_epoch", "layout")
        changed = [k for k in keys if state.get(k, mine[k]) != mine[k]]
        if changed:
            raise ConfigError("the checkpoint's bucket sampler does not fit this run (" + ", ".join(
                f"{k} {state[k]} then, {mine[k]} now" for k in changed) + "): the dataset, its buckets, the seed "
                "or the batch size changed", path="job.resume")
        if not 0 <= state["position"] < self.batches_per_epoch:
            raise ConfigError(f"sampler position {state['position']} is outside the epoch "
                              f"({self.batches_per_epoch} batches)", path="job.resume")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def visit_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one visit of one sample (numpy's SeedSequence hash: nearby tuples unrelated)."""
    return int(np.random.SeedSequence([seed % 2**64, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)
