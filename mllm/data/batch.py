"""The batch contract: what a dataset item and a collated micro-batch hold, for every model family.

A dataset's `__getitem__` returns either a sample (a dict with an `id` and the sample's fields) or, for a
bad sample under `skip_bad_samples`, a skip record made by `skipped(Skip(...))`. A collator starts its
batch with `start_batch(items)`, which sets aside the skip records and returns the kept samples and a
batch already holding the two bookkeeping keys, then adds the model's inputs:

    kept, batch = start_batch(items)
    if kept:
        batch["pixel_values"] = torch.cat([it["pixel_values"] for it in kept])

The engine (mllm.training.engine) reads the bookkeeping through `batch_skips` / `batch_ids` (skipped
samples are counted and listed, ids name the samples of a non-finite step) and calls the model with
`model_inputs(batch)`: every other key, as keyword arguments of the model's `forward`. A batch whose
samples were all skipped holds only the bookkeeping keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import torch

__all__ = [
    "BOOKKEEPING",
    "SKIP_KEY",
    "Batch",
    "Skip",
    "batch_ids",
    "batch_skips",
    "is_skipped",
    "model_inputs",
    "skipped",
    "start_batch",
]

SKIP_KEY = "skip"  # the one key of a dataset item that stands for a skipped sample
BOOKKEEPING = ("skips", "ids")  # the batch keys that are not model inputs


@dataclass
class Skip:
    """A sample left out under `skip_bad_samples`, carried to the engine to be counted and listed."""

    sample: str  # the file and line (and id) of the sample
    reason: str  # why it was left out, naming the sample


class Batch(TypedDict, total=False):
    """A collated micro-batch. `skips` and `ids` are always present; the rest is what the stage's model
    takes (keys a model does not take are absent, or ignored by its `forward(**_)`).

    Bookkeeping (never passed to the model):
      skips           the micro-batch's skipped samples, in item order
      ids             the kept samples' ids, in the order of the batch's rows (packed order when packed)

    Token sequences (MultimodalLM; the text towers of contrastive/TIPS/CLOC use the first and third):
      input_ids       [B, T] long, right-padded with the tokenizer's pad id
      labels          [B, T] long, IGNORE_INDEX (-100) where no loss is taken; the tower warm-up's
                      per-patch labels are instead a dict head -> [B, N] long
      attention_mask  [B, T] long, 1 = real token (absent when packed)
      position_ids    [B, T] long, restarting at 0 for each packed sample (packing only)
      token_weights   [B, T] float32 per-token loss weights (PRIOR), 0 where labels are ignored

    Images:
      pixel_values    [n_images, 3, H, W] float in sample order (the image-token splice's order), or
                      None for a text-only batch; [B, 3, H, W] for the vision-only families
      image_features  [n_images, N, D] a frozen tower's cached outputs in place of pixels (feature cache)

    Family-specific inputs, as the family's model names them: hard-negative and long captions
    (`hard_input_ids`, `long_input_ids` and their masks), regions (`region_boxes`, `region_image`,
    `region_input_ids`, `region_attention_mask`), self-distillation views (`global_views`,
    `local_views`, `masks`), scene-label `count`, geometric targets (`box_heat`, ...).
    """

    skips: list[Skip]
    ids: list[Any]
    input_ids: torch.Tensor
    labels: torch.Tensor | dict[str, torch.Tensor]
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    token_weights: torch.Tensor
    pixel_values: torch.Tensor | None
    image_features: torch.Tensor
    look_targets: torch.Tensor  # [n_looks, N]: each look's referent patches (mllm.readout grounding)


def skipped(skip: Skip) -> dict[str, Skip]:
    """The dataset item that stands for a bad sample under `skip_bad_samples`."""
    return {SKIP_KEY: skip}


def is_skipped(item: Mapping[str, Any]) -> bool:
    return SKIP_KEY in item


def start_batch(items: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], Batch]:
    """(the kept samples, a batch holding their `ids` and the skipped samples' `skips`): every collator's
    first line, so the bookkeeping is written once."""
    kept = [it for it in items if SKIP_KEY not in it]
    batch: Batch = {
        "skips": [it[SKIP_KEY] for it in items if SKIP_KEY in it],
        "ids": [it["id"] for it in kept],
    }
    return kept, batch


def batch_skips(batch: Mapping[str, Any]) -> list[Skip]:
    return batch["skips"]


def batch_ids(batch: Mapping[str, Any]) -> list[Any]:
    return batch["ids"]


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch without its bookkeeping: the keyword arguments of the model's `forward`."""
    return {k: v for k, v in batch.items() if k not in BOOKKEEPING}
