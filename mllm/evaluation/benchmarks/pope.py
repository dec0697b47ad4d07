"""POPE (Li et al., 2023): object hallucination as yes/no questions, three negative-sampling splits.

Official layout: JSONL files `<prefix>_pope_{random,popular,adversarial}.json` with lines
{"question_id", "image", "text": "Is there a {obj} in the image?", "label": "yes"|"no"}; images in
`data_dir/images` unless `images=` says otherwise. Every split present is loaded; `prefix=` picks one
set when a folder holds several (coco_pope_*, geoworld_pope_*), which is otherwise an error.

Id scheme: POPE numbers question_id from 1 in *each* split, so the bare id is ambiguous across
splits. An item's id is therefore always "{split}/{question_id}" (e.g. "adversarial/17"), and a
predictions line is {"question_id": "adversarial/17", "response": ...}. Always prefixing (rather
than only on collision) keeps the id of a question independent of which other files are present.

Scoring: by default POPE's official rule (`pope_yes_no`: first sentence, "no"/"not" -> no, else
yes), so numbers compare with published ones; `rule="strict"` uses `extract_yes_no` instead. Per
split: accuracy, precision, recall and F1 with "yes" as the positive class, and yes_ratio — the share
of *predictions* that are yes (computed from labels it is always 50%, a known trap). An unparsed
(empty) answer is wrong, counts as neither yes nor no, and is reported. `mean_f1` averages the splits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mllm.evaluation.extract import extract_yes_no, pope_yes_no

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
)

SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
RULES = {"official": pope_yes_no, "strict": extract_yes_no}
OPTIONS = ("images", "splits", "prefix", "rule")


def _split_file(data_dir: Path, split: str, prefix: str | None) -> Path | None:
    if prefix is not None:
        path = data_dir / f"{prefix}_pope_{split}.json"
        return path if path.is_file() else None
    found = sorted(data_dir.glob(f"*_pope_{split}.json"))
    if len(found) > 1:
        raise BenchmarkError(
            f"{data_dir}: several POPE {split} files {[p.name for p in found]}; choose one set with prefix="
        )
    return found[0] if found else None


def load(
    data_dir: Path,
    *,
    images: str | Path | None = None,
    splits: tuple[str, ...] | list[str] | None = None,
    prefix: str | None = None,
    **other: Any,
) -> list[Item]:
    """Items of every split present (or of `splits`, each of which must then exist), in file order."""
    check_options("pope", other, OPTIONS)
    data_dir = Path(data_dir)
    img_root = Path(images) if images is not None else data_dir / "images"
    wanted = tuple(splits) if splits is not None else SPLITS
    bad = [s for s in wanted if s not in SPLITS]
    if bad:
        raise ValueError(f"unknown POPE split(s) {bad}; expected {SPLITS}")
    items: list[Item] = []
    for split in wanted:
        path = _split_file(data_dir, split, prefix)
        if path is None:
            if splits is not None:
                raise FileNotFoundError(f"POPE: no *_pope_{split}.json in {data_dir}")
            continue
        seen: set[str] = set()
        for n, row in read_json_lines(path):
            where = f"{path}:{n}"
            need_keys(row, ("question_id", "image", "text", "label"), where)
            qid = str(row["question_id"])
            if qid in seen:
                raise BenchmarkError(f"{where}: duplicate question_id {qid!r} in split {split}")
            seen.add(qid)
            label = str(row["label"]).strip().lower()
            if label not in ("yes", "no"):
                raise BenchmarkError(f"{where}: label {row['label']!r} is not yes/no")
            image = image_file(img_root, row["image"], f"{where} (question_id {qid})")
            meta = {"split": split, "question_id": row["question_id"], "label": label, "image": row["image"]}
            items.append(Item(id=f"{split}/{qid}", prompt=str(row["text"]), image=image, meta=meta))
    if not items:
        raise FileNotFoundError(
            f"POPE: no *_pope_{{{','.join(SPLITS)}}}.json files with questions in {data_dir}"
        )
    check_unique(items, str(data_dir))
    return items


def _split_metrics(preds: list[str | None], labels: list[str]) -> dict[str, Any]:
    tp = sum(p == "yes" and y == "yes" for p, y in zip(preds, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(preds, labels))
    tn = sum(p == "no" and y == "no" for p, y in zip(preds, labels))
    pos = sum(y == "yes" for y in labels)
    said_yes = sum(p == "yes" for p in preds)
    precision = percent(tp, tp + fp)
    recall = percent(tp, pos)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": percent(tp + tn, len(labels)),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": percent(said_yes, len(preds)),
        "unparsed": sum(p is None for p in preds),
    }


def score(
    items: list[Item], responses: dict[str, str], *, rule: str = "official", **other: Any
) -> tuple[dict[str, Any], list[dict]]:
    """Per-split accuracy/precision/recall/F1/yes_ratio/unparsed (percent) and the mean F1."""
    check_options("pope", other, OPTIONS)
    if rule not in RULES:
        raise ValueError(f"unknown POPE rule {rule!r}; expected one of {sorted(RULES)}")
    read = RULES[rule]
    records = []
    per_split: dict[str, tuple[list[str | None], list[str]]] = {}
    for item, resp, missing in lookup(items, responses, "pope"):
        pred = read(resp)
        label = item.meta["label"]
        rec = base_record(item, resp, missing, pred, pred == label)
        rec.update(split=item.meta["split"], question_id=item.meta["question_id"], label=label)
        records.append(rec)
        preds, labels = per_split.setdefault(item.meta["split"], ([], []))
        preds.append(pred)
        labels.append(label)
    metrics: dict[str, Any] = {s: _split_metrics(*per_split[s]) for s in SPLITS if s in per_split}
    f1s = [metrics[s]["f1"] for s in SPLITS if s in per_split]
    metrics["mean_f1"] = sum(f1s) / len(f1s) if f1s else 0.0
    return metrics, records


BENCHMARK = register_benchmark(
    Benchmark(name="pope", id_key="question_id", load=load, score=score, max_new_tokens=32, options=OPTIONS)
)
