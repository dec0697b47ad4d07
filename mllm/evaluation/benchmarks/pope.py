"""POPE (Li et al., 2023): object hallucination as yes/no questions, three negative-sampling splits.

Official layout: JSONL files `<prefix>_pope_{random,popular,adversarial}.json` with lines
{"question_id", "image", "text": "Is there a {obj} in the image?", "label": "yes"|"no"}; images in
`data_dir/images` unless `images=` says otherwise. Every split present is loaded; `prefix=` picks one
set when a folder holds several (coco_pope_*, geoworld_pope_*), which is otherwise an error.

Id scheme: POPE numbers question_id from 1 in *each* split, so the bare id is ambiguous across
splits. An item's id is therefore always "{split}/{question_id}" (e.g. "adversarial/17"), and a
predictions line is {"question_id": "adversarial/17", "response": ...}. Always prefixing (rather
than only on collision) keeps the id of a question independent of which other files are present.
Other tools' files (`match`): a line with a bare question_id and a `split` (or `category`) field;
an lmms-eval sample (its doc's `category` and `question_id`, lmms-lab/POPE's); a LLaVA answers file
(integer question_id, `text`) when one split is scored, or with LLaVA's question file
(`questions=llava_pope_test.jsonl`), paired as LLaVA's eval_pope.py pairs them: the k-th answer of a
category with the k-th question of that split's file. Where a row carries its question, it must be
the item's, so ids that do not line up are an error, not a silently wrong score.

Scoring: POPE's official reading (`pope_yes_no`: first sentence, "no"/"not" -> no, else yes), so
numbers compare with published ones. The default rule "mllm" changes one thing: an empty answer is
unparsed (wrong, neither yes nor no, and reported) where the public scorer reads it as "yes";
`rule="official"` is the public scorer exactly, `rule="strict"` reads answers with `extract_yes_no`.
Per split: accuracy, precision, recall and F1 with "yes" as the positive class, and yes_ratio — the
share of *predictions* that are yes (computed from labels it is always 50%, a known trap).
`mean_f1` averages the splits.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from mllm.evaluation.extract import extract_yes_no, pope_yes_no

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
    image_file,
    lookup,
    need_keys,
    percent,
    read_json_lines,
    register_benchmark,
    require_file,
)

SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
RULES = {"mllm": pope_yes_no, "official": partial(pope_yes_no, official=True), "strict": extract_yes_no}
OPTIONS = ("images", "splits", "prefix", "rule", "questions")


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
    items: list[Item], responses: dict[str, str], *, rule: str = "mllm", **other: Any
) -> tuple[dict[str, Any], list[dict]]:
    """Per-split accuracy/precision/recall/F1/yes_ratio/unparsed (percent) and the mean F1."""
    check_options("pope", other, OPTIONS)
    if rule not in RULES:
        raise OptionError(f"unknown POPE rule {rule!r}; expected one of {sorted(RULES)}")
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


def _same_question(row: ForeignRow, ctx: MatchContext, ident: str, text: Any) -> None:
    """A row that quotes its question must quote the item's: ids that do not line up are an error."""
    item = ctx.by_id.get(ident)
    if item is None or not isinstance(text, str) or not text.strip():
        return
    if item.prompt.strip().lower() not in text.lower():
        raise BenchmarkError(
            f"{row.where}: the {row.layout} row for {ident} asks {text.strip()!r}, but POPE's {ident} asks "
            f"{item.prompt!r}: its ids do not line up with {item.meta['split']}'s file"
        )


def _llava_question(row: ForeignRow, ctx: MatchContext) -> str:
    """LLaVA's pairing: the k-th answer whose question (in LLaVA's question file) has category c is
    the k-th question of POPE's c file. Question text and image must agree, or the files differ."""
    state = ctx.state
    if "llava_questions" not in state:
        path = require_file(Path(ctx.options["questions"]), "LLaVA POPE question file")
        state["llava_questions"] = {str(q.get("question_id")): (n, q) for n, q in read_json_lines(path)}
        state["llava_path"] = path
        state["llava_next"] = dict.fromkeys(SPLITS, 0)
    path = state["llava_path"]
    found = state["llava_questions"].get(row.key)
    if found is None:
        raise BenchmarkError(f"{row.where}: question_id {row.key} is not in LLaVA's question file {path}")
    n, q = found
    category = q.get("category")
    split_items = ctx.group("split", lambda it: it.meta["split"]).get(category)
    if split_items is None:
        raise BenchmarkError(f"{path}:{n}: category {category!r} is not a POPE split scored here")
    k = state["llava_next"][category]
    state["llava_next"][category] = k + 1
    if k >= len(split_items):
        raise BenchmarkError(
            f"{row.where}: more {category} answers than the {len(split_items)} {category} questions"
        )
    item = split_items[k]
    text, image = q.get("text"), q.get("image")
    if isinstance(image, str) and image and Path(image).name != Path(str(item.meta["image"])).name:
        raise BenchmarkError(
            f"{path}:{n}: answer {k + 1} of {category} is about {image}, but POPE's {item.id} is about "
            f"{item.meta['image']}: the question file and POPE's files do not line up"
        )
    _same_question(row, ctx, item.id, text)
    return item.id


def match(row: ForeignRow, ctx: MatchContext) -> list[str]:
    """The POPE item another tool's row answers (see the module's docstring)."""
    f = row.fields
    if row.layout == "lmms-eval":
        split, qid = f.get("category"), f.get("question_id")
        if split is None or qid is None:
            raise BenchmarkError(f"{row.where}: the lmms-eval sample's doc has no category/question_id")
        ident = f"{split}/{qid}"
        _same_question(row, ctx, ident, f.get("question"))
        return [ident]
    if row.key is None or row.layout == "vlmevalkit":
        raise BenchmarkError(
            f"{row.where}: {row.layout} rows carry no POPE question_id (VLMEvalKit numbers its own POPE "
            "table); they cannot be matched to POPE's questions"
        )
    qid = row.key
    if "/" in qid:
        return [qid]
    split = f.get("split") or f.get("category")
    if split:
        ident = f"{split}/{qid}"
    elif ctx.options.get("questions"):
        return [_llava_question(row, ctx)]
    else:
        holders = sorted(
            ctx.group("qid", lambda it: str(it.meta["question_id"])).get(qid, []), key=lambda it: it.id
        )
        if not holders:
            return [qid]  # no POPE question has it: reported with every other unknown id
        if len(holders) > 1:
            raise BenchmarkError(
                f"{row.where}: question_id {qid!r} names no split and is in "
                f"{', '.join(it.meta['split'] for it in holders)}: write '{{split}}/{{question_id}}' ids, add a "
                "split field, score one split (--option 'splits=[\"random\"]') or give LLaVA's question file "
                "(--option questions=llava_pope_test.jsonl)"
            )
        ident = holders[0].id
    _same_question(row, ctx, ident, f.get("prompt") if row.layout == "llava" else None)
    return [ident]


BENCHMARK = register_benchmark(
    Benchmark(
        name="pope",
        id_key="question_id",
        load=load,
        score=score,
        max_new_tokens=32,
        options=OPTIONS,
        rules=tuple(RULES),
        match=match,
    )
)
