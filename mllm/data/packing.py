"""Sequence packing: several samples per row, each attending only to itself.

Why: LLaVA-style data mixes 30-token answers with 600-token conversations, so a right-padded batch
is often half padding, and every padded position costs a full pass through the LM. Packing puts the
samples of one micro-batch into as few rows as fit `capacity` tokens and drops most of that padding.

How (the transformers 5 convention, also that of `DataCollatorWithFlattening`): `position_ids`
restart at 0 at each sample and the batch has no `attention_mask`. transformers' `create_causal_mask`
then finds the sample boundaries in the position ids and builds a block-diagonal causal 4D mask for
SDPA / eager attention, and flash-attention 2/3 turns the same position ids into varlen
`cu_seqlens`, so no token attends across a boundary and RoPE positions are per sample.

Bins: first-fit decreasing over the micro-batch (longest sample first, into the first row with
room). The micro-batch (and so the optimiser's sample count and the loss normalisation, per labelled
token over the batch) is exactly the unpacked one; only its layout changes. Rows are padded to the
longest row, not to `capacity`; the padding tail is its own segment (positions 0, 1, ...) with no
labels, so it cannot leak into a sample either.

Labels stay per sample, with one fix-up: the first position of every sample is unlabelled. In an
unpacked row the first label is never used (the loss predicts position t+1 from t), but in a packed
row position `start` would otherwise be predicted from the previous sample's last token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mllm.chat import IGNORE_INDEX

# Attention implementations whose transformers mask code (or varlen kernel) honours packed position ids.
PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


class PackingError(ValueError):
    """A packing request that cannot be honoured (a sample longer than a row, an unsupported LM)."""


def check_packing_support(lm: nn.Module) -> None:
    """Refuse an LM whose attention would silently attend across packed samples."""
    impl = getattr(getattr(lm, "config", None), "_attn_implementation", None)
    if impl not in PACKING_ATTENTION:
        raise PackingError(
            f"packed batches (position_ids without attention_mask) need attention in {PACKING_ATTENTION}; "
            f"this LM uses {impl!r}, whose mask would let samples attend to each other"
        )


def first_fit_decreasing(
    lengths: Sequence[int], capacity: int, names: Sequence[str] | None = None
) -> list[list[int]]:
    """Indices grouped into rows of at most `capacity` tokens; rows in order of creation, samples in
    each row longest first (ties by index, so the layout is deterministic)."""
    if capacity < 1:
        raise PackingError(f"pack capacity must be >= 1, got {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = int(lengths[i])
        if n > capacity:
            who = names[i] if names is not None else f"sample {i}"
            raise PackingError(f"{who}: {n} tokens do not fit a packed row of {capacity} (data.pack_length)")
        for r, left in enumerate(room):
            if n <= left:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def pack_items(items: list[dict[str, Any]], capacity: int, pad_token_id: int) -> dict[str, Any]:
    """The tensors of a packed batch from dataset items (`input_ids`, `labels`, optional
    `token_weights`, `pixel_values`, `image_features`).

    Returns `input_ids`, `labels`, `position_ids` [rows, width], `token_weights` when any item has
    them, images concatenated in row-major order of their samples (the order the model's splice
    fills placeholders), and `order`: the item indices in packed order.
    """
    lengths = [len(it["input_ids"]) for it in items]
    rows = first_fit_decreasing(lengths, capacity, [str(it.get("id", i)) for i, it in enumerate(items)])
    width = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    has_weights = any("token_weights" in it for it in items)
    weights = torch.zeros(shape, dtype=torch.float32) if has_weights else None
    order: list[int] = []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            it, n = items[i], lengths[i]
            input_ids[r, at : at + n] = it["input_ids"]
            labels[r, at : at + n] = it["labels"]
            labels[r, at] = IGNORE_INDEX  # never predicted from the previous sample's last token
            position_ids[r, at : at + n] = torch.arange(n)
            if weights is not None:
                w = it.get("token_weights")
                weights[r, at : at + n] = w if w is not None else (it["labels"] != IGNORE_INDEX).float()
            order.append(i)
            at += n
        position_ids[r, at:] = torch.arange(width - at)  # the padding tail: a segment of its own
    out: dict[str, Any] = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "order": order,
    }
    if weights is not None:
        out["token_weights"] = weights
    for key in ("pixel_values", "image_features"):
        parts = [items[i][key] for i in order if items[i].get(key) is not None]
        out[key] = torch.cat(parts) if parts else None
    return out
