"""Captions with several generated negatives per image, for DeGLA (encoders.degla): GeoWorld `captions.jsonl`.

GeoWorld writes one negative of each kind (`negatives`: attribute, relation, order; mllm.data.geoworld) for
each long caption: a false statement about the image, which is what DeGLA's LLM-generated negatives are.
Each fetch draws `n_negatives` distinct kinds (Python's `random`, which the engine seeds and restores on
resume), or all a row has when it has fewer (a scene of one object has no relation to swap); the
collator pads to the batch's largest count and marks the fillers in `neg_valid`, which the losses leave out. The positive caption is
chosen as in `CaptionDataset` (`data.caption`); the negatives are always the long caption's.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mllm.data.batch import Batch, Skip, is_skipped, skipped, start_batch
from mllm.data.captions import NEGATIVE_KINDS, CaptionDataset
from mllm.data.records import DataError


class NegativesCaptionDataset(CaptionDataset):
    """CaptionDataset items + `negatives`: `n_negatives` distinct negative captions of the image."""

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None,
        preprocess: Callable[[Sequence[Image.Image]], torch.Tensor],
        caption: str = "long",
        n_negatives: int = 3,
        skip_bad_samples: bool = False,
    ):
        super().__init__(path, image_root, preprocess, caption, skip_bad_samples=skip_bad_samples)
        if not 1 <= n_negatives <= len(NEGATIVE_KINDS):
            raise ValueError(f"n_negatives must be in [1, {len(NEGATIVE_KINDS)}], got {n_negatives}")
        self.n_negatives = n_negatives

    def _negatives(self, i: int) -> list[str]:
        row = self.rows[i]
        negs = row.get("negatives") if isinstance(row, dict) else None
        options = [negs[k] for k in NEGATIVE_KINDS if isinstance(negs, dict) and isinstance(negs.get(k), str)]
        if not options:
            raise DataError(
                f"{self._name(i)}: no negative captions (`negatives` with {NEGATIVE_KINDS}); DeGLA needs a "
                "world written by a GeoWorld writer that emits them"
            )
        return random.sample(options, min(self.n_negatives, len(options)))

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = super().__getitem__(i)
        if is_skipped(item):
            return item
        try:
            item["negatives"] = self._negatives(i)
        except DataError as e:
            if self.skip:
                return skipped(Skip(self._name(i), str(e)))
            raise
        return item


class NegativesCaptionCollator:
    """Pixels, the captions, and the negatives flattened image-major: `neg_input_ids` [B·K, T] with
    `neg_valid` [B, K] (False: a filler for an image with fewer than K negatives)."""

    def __init__(self, tokenize: Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]):
        self.tokenize = tokenize

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        items, batch = start_batch(items)
        if not items:
            return batch
        batch["pixel_values"] = torch.cat([it["pixel_values"] for it in items])
        batch["input_ids"], batch["attention_mask"] = self.tokenize([it["text"] for it in items])
        k = max(len(it["negatives"]) for it in items)
        # K columns per image; an image with fewer negatives repeats its first, marked False in `neg_valid`
        flat = [
            it["negatives"][j] if j < len(it["negatives"]) else it["negatives"][0]
            for it in items
            for j in range(k)
        ]
        batch["neg_input_ids"], batch["neg_attention_mask"] = self.tokenize(flat)
        batch["neg_valid"] = torch.tensor([[j < len(it["negatives"]) for j in range(k)] for it in items])
        return batch
