"""MMVP-VLM (Tong et al., "Eyes Wide Shut?"): can a CLIP-style model tell two statements' images apart?

Official layout: `Questions.csv` with three columns (`Question ID, Type, Statement`; read by position,
as the official script does) and `MLLM_VLM Images/<Type>/<Question ID>.jpg`. Rows 2k-1 and 2k are a
pair: two images that differ in one visual pattern and one statement true of each.

Official scoring (kept exactly): the text is "a photo of " + statement; for each statement the
model's logits over the pair's two images are soft-maxed, and the statement picks the first image when
its probability is > 0.5; the truth is the first image for odd ids; a pair counts only when both of its
statements pick right. Scores per pattern are percentages of pairs; the average is their mean.

One deliberate difference: the official script assigns a pair's pattern by its position (15 pairs per
category, in file order); here it is the pair's `Type` column, which also names its image folder, so a
set with another number of pairs per pattern scores correctly.

The model half (`respond`) needs a contrastive model (`encoders.ContrastiveModel`): responses are the
picked image per statement, "img1" or "img2", so a predictions file from any other codebase
(`{"qid": 1, "response": "img1"}` lines) is scored by the same `score`.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

from mllm.data.images import load_image

from .core import (
    Benchmark,
    BenchmarkError,
    Item,
    base_record,
    check_options,
    check_unique,
    image_file,
    lookup,
    percent,
    register_benchmark,
    require_file,
)

OPTIONS = ("images", "prefix")
IMAGE_DIR = "MLLM_VLM Images"
PREFIX = "a photo of "
PICKS = ("img1", "img2")


def load(data_dir: Path, *, images: str | None = None, prefix: str = PREFIX, **other: Any) -> list[Item]:
    """Items in file order; pairs are (2k-1, 2k) by Question ID, checked to be adjacent and same-Type."""
    check_options("mmvp_vlm", other, OPTIONS)
    data_dir = Path(data_dir)
    csv_path = require_file(data_dir / "Questions.csv", "MMVP-VLM questions")
    img_root = Path(images) if images is not None else data_dir / IMAGE_DIR
    with open(csv_path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise BenchmarkError(f"{csv_path}: empty file")
    items: list[Item] = []
    for n, row in enumerate(rows[1:], 2):
        if not any(c.strip() for c in row):
            continue
        where = f"{csv_path}:{n}"
        if len(row) < 3:
            raise BenchmarkError(
                f"{where}: expected 3 columns (Question ID, Type, Statement), got {len(row)}"
            )
        qid_text, pattern, statement = row[0].strip(), row[1].strip(), row[2].strip()
        try:
            qid = int(qid_text)
        except ValueError:
            raise BenchmarkError(f"{where}: Question ID {qid_text!r} is not an integer") from None
        image = image_file(img_root, f"{pattern}/{qid}.jpg", f"{where} (qid {qid})")
        items.append(
            Item(
                str(qid),
                prefix + statement,
                image,
                {"pattern": pattern, "pair": (qid + 1) // 2, "truth": PICKS[(qid + 1) % 2]},
            )
        )
    check_unique(items, str(csv_path))
    if len(items) % 2:
        raise BenchmarkError(f"{csv_path}: {len(items)} statements; pairs need an even number")
    for a, b in zip(items[::2], items[1::2]):
        if int(a.id) % 2 != 1 or int(b.id) != int(a.id) + 1:
            raise BenchmarkError(f"{csv_path}: Question IDs {a.id}, {b.id} do not form a pair (2k-1, 2k)")
        if a.meta["pattern"] != b.meta["pattern"]:
            raise BenchmarkError(
                f"{csv_path}: pair {a.id}/{b.id} mixes types {a.meta['pattern']!r} and {b.meta['pattern']!r}"
            )
    return items


def pick(logits: torch.Tensor) -> list[tuple[str, float]]:
    """logits [P, 2 statements, 2 images] (scale x cosine) -> per statement (pick, P(first image)),
    in statement order: softmax over the two images, the first image when its probability > 0.5."""
    if logits.dim() != 3 or logits.shape[1:] != (2, 2):
        raise ValueError(f"expected logits [pairs, 2, 2], got {tuple(logits.shape)}")
    p_first = logits.float().softmax(-1)[..., 0].reshape(-1)
    return [(PICKS[0] if p > 0.5 else PICKS[1], float(p)) for p in p_first.tolist()]


def score(items: list[Item], responses: dict[str, str], **opts: Any) -> tuple[dict, list[dict]]:
    check_options("mmvp_vlm", opts, OPTIONS)
    rows = lookup(items, responses, "mmvp_vlm")
    records: list[dict] = []
    pairs: dict[str, list[int]] = {}  # pattern -> [pairs right, pairs]
    for (a, ra, ma), (b, rb, mb) in zip(rows[::2], rows[1::2]):
        ok = []
        for it, resp, missing in ((a, ra, ma), (b, rb, mb)):
            got = resp.strip().lower()
            got = got if got in PICKS else None
            right = got == it.meta["truth"]
            ok.append(right)
            records.append(
                dict(
                    base_record(it, resp, missing, got, right),
                    pattern=it.meta["pattern"],
                    pair=it.meta["pair"],
                    truth=it.meta["truth"],
                )
            )
        tally = pairs.setdefault(a.meta["pattern"], [0, 0])
        tally[0] += all(ok)
        tally[1] += 1
    patterns = {k: percent(r, n) for k, (r, n) in pairs.items()}
    metrics = {
        "average": sum(patterns.values()) / len(patterns) if patterns else 0.0,
        "patterns": patterns,
        "pairs": sum(n for _, n in pairs.values()),
        "statement_accuracy": percent(sum(r["correct"] for r in records), len(records)),
    }
    return metrics, records


@torch.no_grad()
def respond(model: Any, items: list[Item], batch_size: int = 64, **opts: Any) -> dict[str, str]:
    """The model's pick per statement (`model`: an encoders.ContrastiveModel)."""
    # each statement against the two images of its pair, scored as the model's objective scores pairs
    _, t2i = model.match_scores(
        [load_image(it.image) for it in items], [it.prompt for it in items], batch_size
    )
    scale = model.logit_scale().float().reshape(()).to(t2i.device)
    pairs = torch.arange(0, len(items), 2)
    rows = torch.stack([pairs, pairs + 1], 1)  # [pairs, 2]: the items (statement k, image k) of a pair
    logits = scale * t2i[rows[:, :, None], rows[:, None, :]]  # [pairs, statement, image]
    return {it.id: p for it, (p, _) in zip(items, pick(logits))}


register_benchmark(
    Benchmark("mmvp_vlm", "qid", load, score, options=OPTIONS, respond=respond, model_kind="contrastive")
)
