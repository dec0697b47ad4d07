"""A deterministic, resumable order of micro-batches.

Epoch `e`'s order is a permutation drawn from `seed + e`, padded by wrapping to a whole number of
global batches (every rank must take the same number of steps; no sample is dropped). A position is
one integer, the number of micro-batches consumed, which is all a checkpoint needs to resume the
exact sequence.

The epoch's permutation depends on (seed, epoch) only, not on the process count: global micro-batch k
is samples [k*G, (k+1)*G) of it (G = batch_size x world), and rank r takes the r-th `batch_size` of
those. So a position is also a count of samples, and a run resumed with another world size or batch
size continues at the same sample (`continue_position`): the union of what all ranks see is the same
stream, nothing repeated or skipped.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class BatchOrder:
    #: Whether the sample stream is the same for every world size (see `continue_position`).
    world_independent = True

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


def continue_position(position: int, saved_global_batch: int, order: BatchOrder) -> int:
    """Where `order` continues a run over the same data that consumed `position` global micro-batches of
    `saved_global_batch` samples each (batch_size x processes of the run that wrote the checkpoint).

    The samples consumed in the current epoch must be a whole number of `order`'s global micro-batches,
    or the two runs' batches straddle each other and a sample would be repeated or skipped: that is a
    ValueError saying which sizes fit. (Each run pads its epochs by wrapping to whole global batches; the
    padding repeats samples by design and may differ in length between the two sizes.) An order whose
    stream depends on the world size (`world_independent` False) continues only from an epoch boundary.
    """
    if saved_global_batch == order.global_batch:
        return position
    saved_per_epoch = -(-order.n // saved_global_batch)
    epoch, k = divmod(position, saved_per_epoch)
    consumed = k * saved_global_batch  # < n: an epoch's last micro-batch holds its last real sample
    if consumed and not order.world_independent:
        raise ValueError(
            f"data.sampler: {type(order).__name__} orders samples differently for each global batch size, so "
            f"a checkpoint taken {consumed} samples into epoch {epoch} cannot continue with "
            f"{order.global_batch} samples a micro-batch (it had {saved_global_batch}): resume with the same "
            "batch_size x processes, or from a checkpoint at an epoch boundary"
        )
    if consumed % order.global_batch:
        raise ValueError(
            f"the checkpoint stopped {consumed} samples into epoch {epoch}, which is not a whole number of this "
            f"run's global micro-batches ({order.batch_size} x {order.world} processes = {order.global_batch}"
            f" samples; the checkpointed run had {saved_global_batch}): choose batch_size x processes dividing "
            f"{consumed}, e.g. {saved_global_batch}"
        )
    return epoch * order.per_epoch + consumed // order.global_batch
