"""A deterministic, resumable order of micro-batches.

Epoch `e`'s order is a permutation drawn from `seed + e`, padded by wrapping to a whole number of
global batches (every rank must take the same number of steps; no sample is dropped). A position is
one integer, the number of micro-batches consumed, which is all a checkpoint needs to resume the
exact sequence.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class BatchOrder:
    def __init__(
        self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True
    ):
        if n <= 0:
            raise ValueError("the dataset is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.global_batch = batch_size * world
        self.per_epoch = -(-n // self.global_batch)

    def epoch_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        total = self.per_epoch * self.global_batch
        return [perm[i % self.n] for i in range(total)]

    def batches(self, start: int, stop: int) -> Iterator[list[int]]:
        """This rank's indices for global micro-batches `start` .. `stop - 1`."""
        epoch_cache: tuple[int, list[int]] | None = None
        for position in range(start, stop):
            epoch, k = divmod(position, self.per_epoch)
            if epoch_cache is None or epoch_cache[0] != epoch:
                epoch_cache = (epoch, self.epoch_indices(epoch))
            begin = k * self.global_batch + self.rank * self.batch_size
            yield epoch_cache[1][begin : begin + self.batch_size]
