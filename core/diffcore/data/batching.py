"""Deterministic, resumable, rank-aware order of dataset indices.

The global stream is epoch 0's permutation, then epoch 1's, ... where epoch ``e`` is
``torch.randperm(n, generator=Generator().manual_seed(seed + e))``. It is cut into global
batches of ``batch_size``; rank ``r`` of ``world_size`` takes the ``r``-th contiguous share of
each, so W processes together see exactly the batches one process would. Batches run across
epoch boundaries, so every sample is seen equally often and no batch is short.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from diffcore.errors import ConfigError


class ShuffledIndices:
    """Infinite index stream; ``state_dict()`` is the same on every rank (epoch, position in it)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, batch_size: int | None = None):
        batch_size = world_size if batch_size is None else batch_size
        if n < 1:
            raise ConfigError(f"cannot sample from an empty dataset (n={n})")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        if batch_size % world_size:
            raise ConfigError(f"global batch size {batch_size} is not divisible by world size {world_size}")
        self.n, self.seed, self.rank, self.world_size, self.batch_size = n, seed, rank, world_size, batch_size
        self.epoch, self.position = 0, 0
        self._perm: tuple[int, torch.Tensor] | None = None

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)))
        return self._perm[1]

    def next_global_batch(self) -> list[int]:
        """The next ``batch_size`` indices of the global stream (what every rank advances by)."""
        out: list[int] = []
        while len(out) < self.batch_size:
            take = min(self.batch_size - len(out), self.n - self.position)
            out += self.permutation(self.epoch)[self.position:self.position + take].tolist()
            self.position += take
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def next_batch(self) -> list[int]:
        """This rank's contiguous share of the next global batch."""
        size = self.local_batch_size
        return self.next_global_batch()[self.rank * size:(self.rank + 1) * size]

    def __iter__(self) -> Iterator[int]:
        """This rank's indices one by one; as a DataLoader ``sampler`` use ``batch_size=local_batch_size``."""
        while True:
            yield from self.next_batch()

    def state_at(self, samples: int) -> dict[str, int]:
        """The state after ``samples`` global samples (to save what a prefetching loader consumed)."""
        return {"epoch": samples // self.n, "position": samples % self.n, "n": self.n, "seed": self.seed}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state.get("n", self.n), state.get("seed", self.seed)) != (self.n, self.seed):
            raise ConfigError(f"sampler state is for a dataset of {state['n']} with seed {state['seed']}, "
                              f"this run has {self.n} with seed {self.seed}")
        if not 0 <= state["position"] < self.n:
            raise ConfigError(f"sampler position {state['position']} is outside the dataset (n={self.n})")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
