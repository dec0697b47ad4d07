"""Image-caption pairs for contrastive training: GeoWorld `captions.jsonl` and its collator.

Each line is `{"id", "image", "short", "long", "negatives": {"attribute", "relation", "order"}}`
(see mllm.data.geoworld.writer). The stage's `data.caption` picks the caption: "long" (the exact one,
the default: fine attributes such as orientation and position are only in it), "short" (noisy alt
text) or "random" (either, drawn per fetch from Python's `random`, which the engine seeds and restores
on resume); and from the fields of mllm.data.geoworld.rewrites: "noisy" (ALIGN: short alt text with a
wrong attribute at a stated rate), "rewrite" (LaCLIP: the long caption or one of its rewrites, drawn
uniformly per fetch), "synthetic" (ALIP's captioner caption) and "description" (DreamLIP's long
multi-sentence caption). `sub_captions: K` (DreamLIP) adds K of the row's sub-captions per sample
(drawn without replacement, with it when a row has fewer), `image_augment` / `text_mask` are CLIP++'s
augmentations (mllm.data.caption_aug); `synthetic` adds the row's synthetic caption (ALIP's second path). Hard negatives (NegCLIP) always come from the long caption's negatives: each is a false
statement about the image whichever caption is the positive.

Hard images (NegCLIP, `hard_images=True`): each sample also carries its nearest neighbour in the data
set, with the neighbour's caption and one of the neighbour's hard negatives, so a batch is NegCLIP's 2B
images and 4B texts. NegCLIP takes the neighbour in CLIP image-embedding space; GeoWorld's long caption
states the whole scene graph, so here the neighbour is the row whose long caption is nearest in
bag-of-words cosine (`caption_neighbours`), rows with the very same caption left out (they would be
false negatives), computed once when the data set is built.

As in ConversationDataset, a bad sample (missing field, unreadable image) raises an error naming the
file, line and id, or with `skip_bad_samples` becomes a `Skip` that the engine counts and lists.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from mllm.data.batch import Batch, Skip, skipped, start_batch
from mllm.data.caption_aug import augment_image, mask_tokens
from mllm.data.images import ImageError, load_image, resolve_image
from mllm.data.records import DataError, read_records

CAPTION_MODES = ("long", "short", "random", "noisy", "rewrite", "synthetic", "description")
NEGATIVE_KINDS = ("attribute", "relation", "order")


def caption_neighbours(texts: Sequence[str], block: int = 256) -> list[int]:
    """For each text, the index of the nearest other text by bag-of-words cosine (ties: the lowest index).

    Texts identical to the query (after lower-casing) are passed over: their image shows the same scene, a
    false negative rather than a hard one; when every other text is identical, the next row is taken.
    Sparse counts times dense blocks of `block` queries: memory O(nnz + N * block + block * vocabulary).
    A single text is its own neighbour."""
    n = len(texts)
    if n < 2:
        return list(range(n))
    vocab: dict[str, int] = {}
    bags: list[dict[int, float]] = []
    for t in texts:
        bag: dict[int, float] = {}
        for w in re.findall(r"\w+", t.lower()):
            j = vocab.setdefault(w, len(vocab))
            bag[j] = bag.get(j, 0.0) + 1.0
        norm = math.sqrt(sum(c * c for c in bag.values())) or 1.0
        bags.append({j: c / norm for j, c in bag.items()})
    n_vocab = max(1, len(vocab))
    rows = [i for i, bag in enumerate(bags) for _ in bag]
    cols = [j for bag in bags for j in bag]
    vals = [c for bag in bags for c in bag.values()]
    m = torch.sparse_coo_tensor([rows, cols], vals, (n, n_vocab), dtype=torch.float32, check_invariants=True)
    keys: dict[str, int] = {}
    key_ids = torch.tensor([keys.setdefault(t.strip().lower(), len(keys)) for t in texts])
    out: list[int] = []
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        q = torch.zeros(r1 - r0, n_vocab)
        for k, bag in enumerate(bags[r0:r1]):
            if bag:
                q[k, list(bag)] = torch.tensor(list(bag.values()))
        sim = torch.sparse.mm(m, q.T).T  # [r, n]
        same = key_ids[None, :] == key_ids[r0:r1, None]  # the query itself and identical captions
        best = sim.masked_fill(same, -2.0).argmax(1)
        for k, i in enumerate(range(r0, r1)):
            j = int(best[k])
            out.append(j if not bool(same[k, j]) else (i + 1) % n)
    return out


class CaptionDataset(Dataset):
    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None,
        preprocess: Callable[[Sequence[Image.Image]], torch.Tensor],
        caption: str = "long",
        hard_negatives: bool = False,
        skip_bad_samples: bool = False,
        hard_images: bool = False,
        image_augment: str | None = None,
        sub_captions: int = 0,
        synthetic: bool = False,
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
        self.image_augment, self.n_sub, self.synthetic = image_augment, sub_captions, synthetic
        self.neighbours: list[int] | None = None
        if hard_images:
            if not hard_negatives:
                raise ValueError(
                    "hard_images needs hard_negatives (a hard image comes with its hard caption)"
                )
            self.neighbours = caption_neighbours(
                [str(r.get("long") or r.get("short") or "") if isinstance(r, dict) else "" for r in self.rows]
            )

    def __len__(self) -> int:
        return len(self.rows)

    def _name(self, i: int) -> str:
        row = self.rows[i]
        sid = row.get("id") if isinstance(row, dict) else None
        return f"{self.path} line {i + 1}" + (f" (id {sid!r})" if sid is not None else "")

    def _text(self, row: dict, name: str) -> str:
        key = self.caption if self.caption != "random" else random.choice(("short", "long"))
        if key == "rewrite":  # LaCLIP: the original or one of its rewrites, uniformly
            options = [row.get("long"), *(row.get("rewrites") or [])]
            if len(options) < 2:
                raise DataError(
                    f"{name}: no 'rewrites' (a world written before them: run `mllm synth` again)"
                )
            text = random.choice(options)
        elif key == "description":
            subs = row.get("sub_captions")
            text = " ".join(subs) if isinstance(subs, list) and subs else None
        else:
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

    def _subs(self, row: dict, name: str) -> list[str]:
        """DreamLIP: `n_sub` of the row's sub-captions (without replacement where the row has enough)."""
        subs = row.get("sub_captions")
        if not isinstance(subs, list) or not subs or not all(isinstance(t, str) and t for t in subs):
            raise DataError(
                f"{name}: no 'sub_captions' (a world written before them: run `mllm synth` again)"
            )
        if len(subs) >= self.n_sub:
            return random.sample(subs, self.n_sub)
        return [random.choice(subs) for _ in range(self.n_sub)]

    def __getitem__(self, i: int) -> dict[str, Any]:
        name = self._name(i)
        row = self.rows[i]
        try:
            if not isinstance(row, dict):
                raise DataError(f"{name}: expected a JSON object, got {type(row).__name__}")
            text = self._text(row, name)
            hard = self._negative(row, name) if self.hard else None
            subs = self._subs(row, name) if self.n_sub else None
            syn = row.get("synthetic") if self.synthetic else None
            if self.synthetic and (not isinstance(syn, str) or not syn.strip()):
                raise DataError(f"{name}: no 'synthetic' caption (ALIP; run `mllm synth` again)")
            image = load_image(resolve_image(self.root, row.get("image")))
            if self.image_augment:
                image = augment_image(image, self.image_augment)
            if self.neighbours is not None:
                j = self.neighbours[i]
                nrow, nname = self.rows[j], f"{name}, hard image {self._name(j)}"
                if not isinstance(nrow, dict):
                    raise DataError(f"{nname}: expected a JSON object, got {type(nrow).__name__}")
                n_text, n_hard = self._text(nrow, nname), self._negative(nrow, nname)
                n_image = load_image(resolve_image(self.root, nrow.get("image")))
        except (DataError, ImageError) as e:
            msg = str(e) if str(e).startswith(str(self.path)) else f"{name}: {e}"
            if self.skip:
                return skipped(Skip(name, msg))
            raise DataError(msg) from e
        out = {"id": str(row.get("id", i)), "pixel_values": self.preprocess([image]), "text": text}
        if hard is not None:
            out["hard"] = hard
        if subs is not None:
            out["sub_texts"] = subs
        if syn is not None:
            out["syn_text"] = syn
        if self.neighbours is not None:
            out.update(
                hard_pixel_values=self.preprocess([n_image]), hard_img_text=n_text, hard_img_hard=n_hard
            )
        return out


class CaptionCollator:
    """Stacks pixels and tokenises the texts of a micro-batch with the text tower's own tokenizer."""

    def __init__(
        self, tokenize: Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]], text_mask: float = 0.0
    ):
        self.tokenize, self.text_mask = tokenize, text_mask

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        items, batch = start_batch(items)
        if not items:
            return batch
        batch["pixel_values"] = torch.cat([it["pixel_values"] for it in items])
        batch["input_ids"], batch["attention_mask"] = self.tokenize([it["text"] for it in items])
        if self.text_mask:  # CLIP++'s text masking, on the positive captions only
            batch["input_ids"], batch["attention_mask"] = mask_tokens(
                batch["input_ids"], batch["attention_mask"], self.text_mask
            )
        if "syn_text" in items[0]:  # ALIP: the synthetic caption of each image
            batch["syn_input_ids"], batch["syn_attention_mask"] = self.tokenize(
                [it["syn_text"] for it in items]
            )
        if "sub_texts" in items[0]:  # DreamLIP: K sub-captions per sample, sample-major [B * K]
            batch["sub_input_ids"], batch["sub_attention_mask"] = self.tokenize(
                [t for it in items for t in it["sub_texts"]]
            )
        if "hard" in items[0]:
            batch["hard_input_ids"], batch["hard_attention_mask"] = self.tokenize(
                [it["hard"] for it in items]
            )
        if "hard_pixel_values" in items[0]:  # NegCLIP's hard image, its caption and its hard caption
            batch["hard_pixel_values"] = torch.cat([it["hard_pixel_values"] for it in items])
            batch["hard_img_input_ids"], batch["hard_img_attention_mask"] = self.tokenize(
                [it["hard_img_text"] for it in items]
            )
            batch["hard_img_hard_input_ids"], batch["hard_img_hard_attention_mask"] = self.tokenize(
                [it["hard_img_hard"] for it in items]
            )
        return batch
