"""Referring-expression grounding in the RefCOCO/+/g style (registered as "refcoco").

Layout: a JSONL file (default `refcoco_val.jsonl`; `file=` for refcoco+/refcocog splits) of
{"id", "image", "width", "height", "sentence", "bbox": [x1, y1, x2, y2]} with the box in pixels of
the original image, images under `data_dir/images` unless `images=` says otherwise.

Prompt (LLaVA-1.5): "Please provide the bounding box coordinate of the region this sentence
describes: {sentence}". The model's box is read by `extract_box` in the coordinate convention the
caller declares — `box_format` "norm1" (default, LLaVA), "norm1000" or "pixel", and `pad_to_square`
when the model saw the image padded to a square — never guessed, because a guess that is wrong for
one model silently costs it most of its score. An unparsable answer is a miss (IoU 0) and counted.

Metrics (percent): acc@0.5 (official), acc@0.25, acc@0.75 (share with IoU ≥ threshold), miou (mean
IoU with misses as 0) and the unparsed count.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mllm.evaluation.extract import BOX_FORMATS, extract_box, iou

from .core import (
    Benchmark,
    BenchmarkError,
    Item,
    base_record,
    check_options,
    check_unique,
    image_file,
    lookup,
    need_keys,
    percent,
    read_json_lines,
    register_benchmark,
    require_file,
)

PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {sentence}"
THRESHOLDS = (0.5, 0.25, 0.75)
OPTIONS = ("file", "images", "box_format", "pad_to_square")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load(
    data_dir: Path, *, file: str = "refcoco_val.jsonl", images: str | Path | None = None, **other: Any
) -> list[Item]:
    """Items in file order; boxes and sizes checked so scoring never meets a malformed one."""
    check_options("refcoco", other, OPTIONS)
    data_dir = Path(data_dir)
    path = require_file(data_dir / file, "grounding")
    img_root = Path(images) if images is not None else data_dir / "images"
    items = []
    for n, row in read_json_lines(path):
        where = f"{path}:{n}"
        need_keys(row, ("id", "image", "width", "height", "sentence", "bbox"), where)
        ident = str(row["id"])
        w, h, box = row["width"], row["height"], row["bbox"]
        if not (_number(w) and _number(h) and w > 0 and h > 0):
            raise BenchmarkError(f"{where} (id {ident}): width/height {w!r}x{h!r} are not positive numbers")
        if not (
            isinstance(box, list)
            and len(box) == 4
            and all(_number(v) for v in box)
            and box[0] <= box[2]
            and box[1] <= box[3]
        ):
            raise BenchmarkError(f"{where} (id {ident}): bbox {box!r} is not [x1, y1, x2, y2] pixels")
        image = image_file(img_root, row["image"], f"{where} (id {ident})")
        sentence = str(row["sentence"])
        meta = {
            "sentence": sentence,
            "bbox": [float(v) for v in box],
            "width": w,
            "height": h,
            "image": row["image"],
        }
        items.append(Item(id=ident, prompt=PROMPT.format(sentence=sentence), image=image, meta=meta))
    check_unique(items, str(path))
    return items


def score(
    items: list[Item],
    responses: dict[str, str],
    *,
    box_format: str = "norm1",
    pad_to_square: bool = False,
    **other: Any,
) -> tuple[dict[str, Any], list[dict]]:
    """acc@{0.5,0.25,0.75}, mean IoU and unparsed; records carry the pixel box and its IoU."""
    check_options("refcoco", other, OPTIONS)
    if box_format not in BOX_FORMATS:
        raise ValueError(f"unknown box_format {box_format!r}; expected one of {BOX_FORMATS}")
    records = []
    ious = []
    for item, resp, missing in lookup(items, responses, "refcoco"):
        m = item.meta
        box = extract_box(resp, box_format, m["width"], m["height"], pad_to_square)
        overlap = iou(box, m["bbox"])
        ious.append(overlap)
        rec = base_record(item, resp, missing, box, overlap >= 0.5)
        rec.update(iou=overlap, bbox=m["bbox"], sentence=m["sentence"], width=m["width"], height=m["height"])
        records.append(rec)
    metrics: dict[str, Any] = {f"acc@{t}": percent(sum(v >= t for v in ious), len(ious)) for t in THRESHOLDS}
    metrics["miou"] = percent(sum(ious), len(ious))
    metrics["unparsed"] = sum(r["extracted"] is None for r in records)
    return metrics, records


BENCHMARK = register_benchmark(
    Benchmark(name="refcoco", id_key="id", load=load, score=score, max_new_tokens=64, options=OPTIONS)
)
