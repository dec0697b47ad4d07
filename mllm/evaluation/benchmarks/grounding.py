"""Referring-expression grounding in the RefCOCO/+/g style (registered as "refcoco").

Layouts (`refcoco_sources`; `layout=` picks one, else the one whose files are in the folder): our
JSONL (`refcoco_{split}.jsonl` or `file=`: {"id", "image", "width", "height", "sentence", "bbox":
[x1, y1, x2, y2]} in pixels of the original image), lmms-lab/RefCOCO's rows (parquet or JSON lines;
several sentences a row, `bbox` [x, y, w, h]) and refer's `refs(unc).p` + `instances.json`.
`split=` (default val) picks the split: val, test, testA, testB. Images under `data_dir/images`
unless `images=` says otherwise.

Prompt (LLaVA-1.5): "Please provide the bounding box coordinate of the region this sentence
describes: {sentence}". The model's box is read by `extract_box` in the coordinate convention the
caller declares — `box_format` "norm1" (default, LLaVA), "norm1000" or "pixel", and `pad_to_square`
when the model saw the image padded to a square — never guessed, because a guess that is wrong for
one model silently costs it most of its score. An unparsable answer is a miss (IoU 0) and counted.

Rules: "mllm" (default) repairs what a model plainly meant — a box in parentheses or as two corner
pairs, reversed corners, a box running off the image (clipped) — where lmms-eval's scorer gives IoU
0; `rule=official` is lmms-eval's scorer exactly (`extract_box_official`, `iou_official`: the first
"[x1, y1, x2, y2]" in square brackets, 0–1 of the image, nothing repaired), for numbers that compare
with lmms-eval's. It takes norm1 boxes without padding only, as lmms-eval does.

Metrics (percent): acc@0.5 (official), acc@0.25, acc@0.75 (share with IoU ≥ threshold), miou (mean
IoU with misses as 0) and the unparsed count.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

from mllm.evaluation.extract import BOX_FORMATS, extract_box, extract_box_official, iou, iou_official

from .core import (
    Benchmark,
    BenchmarkError,
    ForeignRow,
    Item,
    MatchContext,
    OptionError,
    base_record,
    check_options,
    check_unique,
    lookup,
    percent,
    register_benchmark,
)
from .refcoco_sources import REFCOCO_LAYOUTS, Source, read_source

THRESHOLDS = (0.5, 0.25, 0.75)
RULES = ("mllm", "official")
OPTIONS = ("file", "images", "box_format", "pad_to_square", "rule", "split", "split_by", "layout")


def load(
    data_dir: Path,
    *,
    file: str | None = None,
    images: str | Path | None = None,
    split: str = "val",
    split_by: str | None = None,
    layout: str | None = None,
    **other: Any,
) -> list[Item]:
    """Items of `split` in file order; boxes and sizes checked so scoring never meets a malformed one."""
    check_options("refcoco", other, OPTIONS)
    if layout is not None and layout not in REFCOCO_LAYOUTS:
        raise OptionError(f"unknown RefCOCO layout {layout!r}; known: {', '.join(REFCOCO_LAYOUTS.known())}")
    data_dir = Path(data_dir)
    img_root = Path(images) if images is not None else data_dir / "images"
    src = Source(data_dir, str(split), img_root, file, split_by)
    name, items = read_source(src, layout)
    check_unique(items, f"{data_dir} ({name} layout, split {split})")
    return items


def score(
    items: list[Item],
    responses: dict[str, str],
    *,
    box_format: str = "norm1",
    pad_to_square: bool = False,
    rule: str = "mllm",
    **other: Any,
) -> tuple[dict[str, Any], list[dict]]:
    """acc@{0.5,0.25,0.75}, mean IoU and unparsed; records carry the pixel box and its IoU."""
    check_options("refcoco", other, OPTIONS)
    if box_format not in BOX_FORMATS:
        raise OptionError(f"unknown box_format {box_format!r}; expected one of {BOX_FORMATS}")
    if rule not in RULES:
        raise OptionError(f"unknown RefCOCO rule {rule!r}; expected one of {RULES}")
    if rule == "official" and (box_format != "norm1" or pad_to_square):
        raise OptionError(
            "rule=official is lmms-eval's RefCOCO scorer, which reads [x1, y1, x2, y2] in 0-1 of the image "
            "as given: it takes box_format=norm1 without pad_to_square"
        )
    records = []
    ious = []
    for item, resp, missing in lookup(items, responses, "refcoco"):
        m = item.meta
        w, h = m["width"], m["height"]
        if rule == "official":
            norm = extract_box_official(resp)
            truth = [m["bbox"][0] / w, m["bbox"][1] / h, m["bbox"][2] / w, m["bbox"][3] / h]
            overlap = iou_official(truth, norm if norm is not None else [0.0, 0.0, 0.0, 0.0])
            box = None if norm is None else [norm[0] * w, norm[1] * h, norm[2] * w, norm[3] * h]
        else:
            box = extract_box(resp, box_format, w, h, pad_to_square)
            overlap = iou(box, m["bbox"])
        ious.append(overlap)
        rec = base_record(item, resp, missing, box, overlap >= 0.5)
        rec.update(iou=overlap, bbox=m["bbox"], sentence=m["sentence"], width=w, height=h)
        records.append(rec)
    metrics: dict[str, Any] = {f"acc@{t}": percent(sum(v >= t for v in ious), len(ious)) for t in THRESHOLDS}
    metrics["miou"] = percent(sum(ious), len(ious))
    metrics["unparsed"] = sum(r["extracted"] is None for r in records)
    return metrics, records


def match(row: ForeignRow, ctx: MatchContext) -> list[str]:
    """Another tool's row -> item id. lmms-eval's RefCOCO samples are lmms-lab rows exploded into one
    sample per sentence (doc: question_id, answer = the sentence): matched by both, in order when a
    row repeats a sentence. LLaVA-style rows carry our id as question_id."""
    if row.layout == "lmms-eval":
        qid, sentence = row.fields.get("question_id"), row.fields.get("answer")
        queues = ctx.state.get("sentences")
        if queues is None:
            queues = {}
            for it in ctx.items:
                if "question_id" in it.meta:
                    queues.setdefault((it.meta["question_id"], it.meta["sentence"]), deque()).append(it.id)
            ctx.state["sentences"] = queues
        queue = queues.get((str(qid), sentence))
        if not queue:
            raise BenchmarkError(
                f"{row.where}: lmms-eval sample (question_id {qid}, sentence {sentence!r}) matches no sentence of "
                "the loaded RefCOCO rows (lmms-eval's samples map onto lmms-lab/RefCOCO's rows, split as scored)"
            )
        return [queue.popleft()]
    if row.layout == "vlmevalkit" or row.key is None:
        raise BenchmarkError(f"{row.where}: {row.layout} rows cannot be matched to RefCOCO's sentences")
    return [row.key]


BENCHMARK = register_benchmark(
    Benchmark(
        name="refcoco",
        id_key="id",
        load=load,
        score=score,
        max_new_tokens=64,
        options=OPTIONS,
        rules=RULES,
        match=match,
    )
)
