"""Image-caption pairs for contrastive training: GeoWorld `captions.jsonl` and its collator.

Each line is `{"id", "image", "short", "long", "negatives": {"attribute", "relation", "order"}}`
(see mllm.data.geoworld.writer). The stage's `data.caption` picks the caption: "long" (the exact one,
the default: fine attributes such as orientation and position are only in it), "short" (noisy alt
text) or "random" (either, drawn per fetch from Python's `random`, which the engine seeds and restores
on resume). Hard negatives (NegCLIP) always come from the long caption's negatives: each is a false
statement about the image whichever caption is the positive.

As in ConversationDataset, a bad sample (missing field, unreadable image) raises an error naming the
file, line and id, or with `skip_bad_samples` becomes a `Skip` that the engine counts and lists.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from mllm.data.batch import Batch, Skip, skipped, start_batch
from mllm.data.images import ImageError, load_image, resolve_image
from mllm.data.records import DataError, read_records

CAPTION_MODES = ("long", "short", "random")
NEGATIVE_KINDS = ("attribute", "relation", "order")


class CaptionDataset(Dataset):
    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None,
        preprocess: Callable[[Sequence[Image.Image]], torch.Tensor],
        caption: str = "long",
        hard_negatives: bool = False,
        skip_bad_samples: bool = False,
    ):
        if caption not in CAPTION_MODES:
            raise ValueError(f"data.caption must be one of {CAPTION_MODES}, got {caption!r}")
        self.path = Path(path)
        self.root = Path(image_root) if image_root is not None else self.path.parent
        self.rows = read_records(self.path)
        if not self.rows:
            raise DataError(f"{self.path}: no samples")
        self.preprocess, self.caption, self.hard, self.skip = (
            preprocess,
            caption,
            hard_negatives,
            skip_bad_samples,
        )

    def __len__(self) -> int:
        return len(self.rows)

    def _name(self, i: int) -> str:
        row = self.rows[i]
        sid = row.get("id") if isinstance(row, dict) else None
        return f"{self.path} line {i + 1}" + (f" (id {sid!r})" if sid is not None else "")

    def _text(self, row: dict, name: str) -> str:
        key = self.caption if self.caption != "random" else random.choice(("short", "long"))
        text = row.get(key)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{name}: no {key!r} caption")
        return text

    def _negative(self, row: dict, name: str) -> str:
        negs = row.get("negatives")
        options = [negs[k] for k in NEGATIVE_KINDS if isinstance(negs, dict) and isinstance(negs.get(k), str)]
        if not options:
            raise DataError(
                f"{name}: no hard negatives (`negatives` with {NEGATIVE_KINDS}); NegCLIP needs a "
                "world written by a GeoWorld writer that emits them"
            )
        return random.choice(options)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name = self._name(i)
        row = self.rows[i]
        try:
            if not isinstance(row, dict):
                raise DataError(f"{name}: expected a JSON object, got {type(row).__name__}")
            text = self._text(row, name)
            hard = self._negative(row, name) if self.hard else None
            image = load_image(resolve_image(self.root, row.get("image")))
        except (DataError, ImageError) as e:
            msg = str(e) if str(e).startswith(str(self.path)) else f"{name}: {e}"
            if self.skip:
                return skipped(Skip(name, msg))
            raise DataError(msg) from e
        out = {"id": str(row.get("id", i)), "pixel_values": self.preprocess([image]), "text": text}
        if hard is not None:
            out["hard"] = hard
        return out


class CaptionCollator:
    """Stacks pixels and tokenises the texts of a micro-batch with the text tower's own tokenizer."""

    def __init__(self, tokenize: Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]):
        self.tokenize = tokenize

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        items, batch = start_batch(items)
        if not items:
            return batch
        batch["pixel_values"] = torch.cat([it["pixel_values"] for it in items])
        batch["input_ids"], batch["attention_mask"] = self.tokenize([it["text"] for it in items])
        if "hard" in items[0]:
            batch["hard_input_ids"], batch["hard_attention_mask"] = self.tokenize(
                [it["hard"] for it in items]
            )
        return batch
