"""LLaVA-format conversation data: the dataset and its collator.

Samples are validated where it is cheap (at load: JSON syntax, fields, roles) and where it is not
(at fetch: image decoding, tokenisation, length). A bad sample raises an error naming the file and
the sample; with `skip_bad_samples` it is returned as a skip record instead, which the collator passes
on so the engine counts and lists it. Nothing is truncated or dropped without a trace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from mllm.chat import IGNORE_INDEX, SampleError, encode_conversation, normalise_turns
from mllm.data.batch import Batch, Skip, skipped, start_batch
from mllm.data.images import ImageError, load_image, resolve_image
from mllm.data.packing import pack_items
from mllm.data.records import DataError, read_records  # noqa: F401  (lazy; re-exported)


def sample_name(path: str | Path, index: int, record: Any) -> str:
    sid = record.get("id") if isinstance(record, dict) else None
    return f"{path} sample #{index}" + (f" (id {sid!r})" if sid is not None else "")


def image_paths(record: dict) -> list[str]:
    img = record.get("image")
    if img is None:
        return []
    return list(img) if isinstance(img, list) else [img]


class ConversationDataset(Dataset):
    def __init__(
        self,
        json_path: str | Path,
        image_root: str | Path | None,
        tokenizer: PreTrainedTokenizerBase,
        template: str,
        image_token_id: int,
        num_image_tokens: int,
        preprocess: Callable[[Sequence[Image.Image]], torch.Tensor] | None,
        max_length: int | None,
        skip_bad_samples: bool = False,
    ):
        self.path = Path(json_path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.tokenizer = tokenizer
        self.template = template
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.preprocess = preprocess
        self.max_length = max_length
        self.skip_bad_samples = skip_bad_samples
        self.records = read_records(self.path)
        # image paths -> pre-projector features [n, N, D]; set by mllm.feature_cache.attach, else None
        self.features: Callable[[list[Path], str], torch.Tensor] | None = None
        self.load_errors: dict[int, str] = {}
        # A readout's look token (MultimodalLM.meta.look_token), set by the family that builds the task.
        self.look_token: str | None = None
        self.look_at: str = "question"
        for i, rec in enumerate(self.records):
            try:
                self._check_structure(i, rec)
            except SampleError as e:
                if not skip_bad_samples:
                    raise
                self.load_errors[i] = str(e)

    def _check_structure(self, i: int, rec: Any) -> None:
        name = sample_name(self.path, i, rec)
        if not isinstance(rec, dict):
            raise SampleError(f"{name}: a sample must be an object")
        if "conversations" not in rec:
            raise SampleError(f"{name}: missing 'conversations'")
        normalise_turns(rec["conversations"], name)
        for p in image_paths(rec):
            if not isinstance(p, str):
                raise SampleError(f"{name}: image entry {p!r} is not a path string")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        name = sample_name(self.path, i, rec)
        if i in self.load_errors:
            return skipped(Skip(name, self.load_errors[i]))
        try:
            return self._fetch(i, rec, name)
        except (SampleError, ImageError) as e:
            msg = str(e) if str(e).startswith(str(self.path)) else f"{name}: {e}"
            if self.skip_bad_samples:
                return skipped(Skip(name, msg))
            raise SampleError(msg) from e

    def _fetch(self, i: int, rec: dict, name: str) -> dict[str, Any]:
        paths = image_paths(rec)
        enc = encode_conversation(
            rec["conversations"],
            self.tokenizer,
            self.template,
            self.image_token_id,
            self.num_image_tokens,
            num_images=len(paths),
            max_length=self.max_length,
            sample=name,
            look_token=self.look_token,
            look_at=self.look_at,
        )
        pixel_values = None
        features = None
        if paths and self.features is not None:  # a frozen tower's cached outputs (mllm.feature_cache)
            features = self.features([resolve_image(self.image_root, p) for p in paths], name)
        elif paths:
            if self.preprocess is None:
                raise SampleError(f"{name}: has an image but the model has no vision tower")
            images = [load_image(resolve_image(self.image_root, p)) for p in paths]
            pixel_values = self.preprocess(images)
        out = {"index": i, "id": rec.get("id", str(i)), **enc, "pixel_values": pixel_values}
        if features is not None:
            out["image_features"] = features
        if "token_weights" in rec:
            out["token_weights"] = torch.tensor(rec["token_weights"], dtype=torch.float32)
        return out


class Collator:
    """Right-pads a batch; concatenates images in sample order (the order the splice expects).

    With `pack_length`, the batch's samples are packed into rows of at most that many tokens instead
    (`mllm.data.packing`: position ids restart per sample, no attention_mask); `ids` then lists the
    samples in packed order.
    """

    def __init__(self, pad_token_id: int, pack_length: int | None = None):
        self.pad_token_id = pad_token_id
        self.pack_length = pack_length

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        items, batch = start_batch(items)
        if not items:
            return batch
        if self.pack_length:
            packed = pack_items(items, self.pack_length, self.pad_token_id)
            order = packed.pop("order")
            batch["ids"] = [items[i]["id"] for i in order]
            batch.update({k: v for k, v in packed.items() if v is not None or k == "pixel_values"})
            _look_targets(batch, [items[i] for i in order])
            return batch
        n = max(len(it["input_ids"]) for it in items)
        b = len(items)
        input_ids = torch.full((b, n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, n), IGNORE_INDEX, dtype=torch.long)
        attn = torch.zeros((b, n), dtype=torch.long)
        weights = None
        if any("token_weights" in it for it in items):
            weights = torch.zeros((b, n), dtype=torch.float32)
        for r, it in enumerate(items):
            k = len(it["input_ids"])
            input_ids[r, :k] = it["input_ids"]
            labels[r, :k] = it["labels"]
            attn[r, :k] = 1
            if weights is not None:
                w = it.get("token_weights")
                weights[r, :k] = w if w is not None else (it["labels"] != IGNORE_INDEX).float()
        pix = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
        batch.update(
            input_ids=input_ids,
            labels=labels,
            attention_mask=attn,
            pixel_values=torch.cat(pix) if pix else None,
        )
        feats = [it["image_features"] for it in items if it.get("image_features") is not None]
        if feats:  # pre-projector tokens from mllm.feature_cache, in place of pixels
            batch["image_features"] = torch.cat(feats)
        if weights is not None:
            batch["token_weights"] = weights
        _look_targets(batch, items)
        return batch


def _look_targets(batch: dict[str, Any], items: list[dict[str, Any]]) -> None:
    """The looks' grounding targets (mllm.data.geoworld.referents), one row per look in the order the
    looks appear in the batch (row-major: the samples' order, each sample's turns in order)."""
    rows = [it["look_targets"] for it in items if "look_targets" in it]
    if not rows:
        return
    if len(rows) != len(items):
        raise ValueError("look_targets: some samples of the batch have them and some do not")
    batch["look_targets"] = torch.cat(rows)


def left_pad(seqs: list[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask for batched generation (each row's prompt ends at the last column)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, n - len(s) :] = s
        mask[r, n - len(s) :] = 1
    return ids, mask
