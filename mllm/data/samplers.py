"""Micro-batch orders as a registry: `random` (BatchOrder) and LLaVA's `modality_length` grouping.

LLaVA-1.5's `--group_by_modality_length` keeps image+text and text-only samples in separate batches
(a text-only batch then skips the vision tower entirely, and mixed batches do not waste their padding)
and groups samples of similar length, so less of each batch is padding. Here it is an order like
`BatchOrder`: a pure function of (seed, epoch), so a resumed run continues at the same micro-batch
from the one integer a checkpoint stores (the position), on every rank alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from encoders.registry import Registry
from mllm.data.conversations import image_paths
from mllm.data.order import BatchOrder

__all__ = ["ORDERS", "ModalityLengthOrder", "build_order", "modality_lengths"]


def _records(dataset: Any) -> tuple[list, int]:
    """The LLaVA records and image token count behind `dataset` (unwrapping dataset wrappers)."""
    seen = 0
    while dataset is not None and seen < 5:
        if hasattr(dataset, "records"):
            return dataset.records, int(getattr(dataset, "num_image_tokens", 0) or 0)
        dataset = next(
            (getattr(dataset, a) for a in ("base", "dataset", "ds", "inner") if hasattr(dataset, a)), None
        )
        seen += 1
    raise ValueError("data.sampler: modality_length needs a conversation dataset (LLaVA JSON records)")


def modality_lengths(records: Sequence[Any], num_image_tokens: int) -> list[int]:
    """LLaVA's `modality_lengths`: a length per sample, positive with an image, negative without.

    The length is the word count of all turns (plus the image's tokens), a cheap proxy that needs no
    tokenisation of the whole set at start-up (665k samples); it only has to rank samples.
    """
    out = []
    for rec in records:
        turns = rec.get("conversations", []) if isinstance(rec, dict) else []
        words = sum(
            len(t.get("value", "").split())
            for t in turns
            if isinstance(t, dict) and isinstance(t.get("value"), str)
        )
        n_img = len(image_paths(rec)) if isinstance(rec, dict) else 0
        out.append(max(1, words + n_img * num_image_tokens) if n_img else -max(1, words))
    return out


def _even_chunks(indices: list[int], lengths: Sequence[int], n_chunks: int, size: int) -> list[list[int]]:
    """Longest first, each into the chunk with the least total length that has room (LLaVA's
    split_to_even_chunks): every rank's micro-batch gets a similar share of tokens."""
    chunks: list[list[int]] = [[] for _ in range(n_chunks)]
    totals = [0] * n_chunks
    for i in sorted(indices, key=lambda j: -abs(lengths[j])):
        open_ = [c for c in range(n_chunks) if len(chunks[c]) < size]
        c = min(open_, key=lambda k: totals[k])
        chunks[c].append(i)
        totals[c] += abs(lengths[i])
    return chunks


class ModalityLengthOrder(BatchOrder):
    """Global batches of one modality each, samples of similar length together, shuffled per epoch."""

    world_independent = False  # batches are built and split per global batch size

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        group: int = 8,
    ):
        super().__init__(len(lengths), batch_size, seed, rank, world)
        self.lengths = list(lengths)
        self.group = max(1, group)

    def _megabatches(self, pool: list[int], g: torch.Generator) -> tuple[list[list[int]], list[int]]:
        """Whole global batches of `pool` + the rest.

        The shuffled pool is cut into megabatches of `group` global batches; each is sorted by length
        and cut into global batches (so a batch holds similar lengths: less padding), and each global
        batch is split across ranks with even token totals. LLaVA sorts within one global batch only
        (group=1), which balances ranks but leaves the padding; `group` > 1 is the Trainer's
        `group_by_length` idea on top of it.
        """
        perm = [pool[i] for i in torch.randperm(len(pool), generator=g).tolist()]
        gb = self.global_batch
        full = len(perm) // gb * gb
        batches = []
        for s in range(0, full, gb * self.group):
            mega = sorted(perm[s : min(s + gb * self.group, full)], key=lambda j: -abs(self.lengths[j]))
            for b in range(0, len(mega), gb):
                chunks = _even_chunks(mega[b : b + gb], self.lengths, self.world, self.batch_size)
                batches.append([i for c in chunks for i in c])
        return batches, perm[full:]

    def epoch_indices(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        multimodal = [i for i, n in enumerate(self.lengths) if n > 0]
        text_only = [i for i, n in enumerate(self.lengths) if n < 0]
        mm_batches, mm_rest = self._megabatches(multimodal, g)
        lang_batches, lang_rest = self._megabatches(text_only, g)
        batches = mm_batches + lang_batches
        order = torch.randperm(len(batches), generator=g).tolist()
        flat = [i for b in order for i in batches[b]]
        # The two remainders (each smaller than a global batch) form the last, mixed batch(es), as in
        # LLaVA; wrapping pads the epoch to whole global batches exactly as BatchOrder does.
        rest = mm_rest + lang_rest
        total = self.per_epoch * self.global_batch
        flat += rest
        return [flat[i % len(flat)] for i in range(total)] if flat else []


def _checked_lengths(dataset: Dataset) -> list[int]:
    lengths = modality_lengths(*_records(dataset))
    if len(lengths) != len(dataset):
        raise ValueError(
            f"data.sampler: modality_length found {len(lengths)} records for a dataset of "
            f"{len(dataset)} items (a wrapper that regroups samples); use sampler: random"
        )
    return lengths


OrderFactory = Callable[[Dataset, int, int, int, int], BatchOrder]
ORDERS: Registry[OrderFactory] = Registry("micro-batch order")
ORDERS.register("random", lambda ds, bs, seed, rank, world: BatchOrder(len(ds), bs, seed, rank, world))
# In index order: for streams whose every index is already a fresh random draw (live GeoWorld),
# where the index may also carry a curriculum.
ORDERS.register(
    "sequential", lambda ds, bs, seed, rank, world: BatchOrder(len(ds), bs, seed, rank, world, shuffle=False)
)
ORDERS.register(
    "modality_length",
    lambda ds, bs, seed, rank, world: ModalityLengthOrder(_checked_lengths(ds), bs, seed, rank, world),
)


def build_order(
    name: str, dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world: int = 1
) -> BatchOrder:
    """The micro-batch order `data.sampler` names, over `dataset`."""
    if name not in ORDERS:
        raise ValueError(f"data.sampler: unknown {name!r}; known: {ORDERS.known()}")
    return ORDERS[name](dataset, batch_size, seed, rank, world)
