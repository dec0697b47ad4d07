"""MMVP (Tong et al., "Eyes Wide Shut?"): 150 pairs of CLIP-blind images, 300 two-option questions.

Official layout: `Questions.csv` (columns `Index, Question, Options, Correct Answer`; options
"(a) Open (b) Closed", answers "(a)"/"(b)") and `MMVP Images/<Index>.jpg`. Rows 2k-1 and 2k are a
pair (the same question on two images that CLIP embeds alike) and a pair scores only when both
answers are right; that is the official metric, chance is 25%. Items keep file order and pairs are
formed by Index, never by position after any reordering.

Label errata: a public copy of the CSV has the answers of items 99/100 and 279/280 swapped. We do
not patch the data silently; pass `answer_overrides=` a JSON file {"99": "(a)", "100": "(b)", ...}
with the answers you have checked against the images, and every overridden item is marked in the
records ("overridden": true, "original_answer").

Prompts: `"{Question} {Options}"` (LLaVA's), or with `letter_prompt=True`
`"{Question}\\nA. …\\nB. …\\nAnswer with the option's letter from the given choices directly."`; option
(a) is shown as A and (b) as B, and since extraction is case-blind, "A" and "(a)" score the same.
An answer given as an option's text is matched exactly first (`extract_option`), so options that
differ only by punctuation — `(a) "Happy Easter"` / `(b) "Happy Easter!"` — stay apart.

Other tools' files: MMVP's evaluate_mllm.py and LLaVA-style answers (`question_id` = Index),
lmms-eval samples (the doc's `Index`), VLMEvalKit's MMVP table (`index`, from 0 or 1, as Index).
The official scorer (scripts/gpt_grader.py) asks GPT-4 whether each answer is right; there is no
offline equivalent, so MMVP has one rule, this one.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from mllm.evaluation.extract import extract_option, parse_options

from .core import (
    Benchmark,
    BenchmarkError,
    ForeignRow,
    Item,
    MatchContext,
    base_record,
    check_options,
    check_unique,
    lookup,
    percent,
    register_benchmark,
    require_file,
)

COLUMNS = ("Index", "Question", "Options", "Correct Answer")
LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."
OPTIONS = ("answer_overrides", "letter_prompt", "images")


def _letter(answer: str, options: dict[str, str], where: str) -> str:
    """ "(b)", "b", "B" -> "b", checked against the options."""
    a = str(answer).strip().strip("()").strip().lower()
    if a not in options:
        raise BenchmarkError(f"{where}: answer {answer!r} is not one of the options {sorted(options)}")
    return a


def _overrides(path: str | Path | None) -> dict[str, str]:
    if path is None:
        return {}
    path = Path(path)
    require_file(path, "MMVP answer overrides")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise BenchmarkError(f"{path}: expected an object {{Index: answer}}")
    return {str(k).strip(): str(v) for k, v in raw.items()}


def load(
    data_dir: Path,
    *,
    answer_overrides: str | Path | None = None,
    letter_prompt: bool = False,
    images: str | Path | None = None,
    **other: Any,
) -> list[Item]:
    """MMVP items in file order; `images` defaults to `data_dir/"MMVP Images"`."""
    check_options("mmvp", other, OPTIONS)
    data_dir = Path(data_dir)
    path = require_file(data_dir / "Questions.csv", "MMVP questions")
    img_dir = Path(images) if images is not None else data_dir / "MMVP Images"
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise BenchmarkError(f"{path}: columns {header} lack {missing}")
        rows = [({(k or "").strip(): (v or "") for k, v in row.items()}, reader.line_num) for row in reader]
    overrides = _overrides(answer_overrides)
    items: list[Item] = []
    for row, line in rows:
        where = f"{path}:{line}"
        index = row["Index"].strip()
        if not index.isdigit() or int(index) < 1:
            raise BenchmarkError(f"{where}: Index {index!r} is not a positive integer")
        options = parse_options(row["Options"])
        if len(options) < 2:
            raise BenchmarkError(f"{where}: options {row['Options']!r} are not '(a) ... (b) ...'")
        answer = original = _letter(row["Correct Answer"], options, f"{where} (Index {index})")
        overridden = index in overrides
        if overridden:
            answer = _letter(overrides.pop(index), options, f"{answer_overrides} (Index {index})")
        image = img_dir / f"{index}.jpg"
        if not image.is_file():
            raise BenchmarkError(f"{where}: image {image} for Index {index} not found")
        question = row["Question"].strip()
        if letter_prompt:
            lines = "\n".join(f"{k.upper()}. {v}" for k, v in options.items())
            prompt = f"{question}\n{lines}\n{LETTER_SUFFIX}"
        else:
            prompt = f"{question} {row['Options'].strip()}"
        meta: dict[str, Any] = {
            "answer": answer,
            "options": options,
            "pair": (int(index) + 1) // 2,
            "overridden": overridden,
        }
        if overridden:
            meta["original_answer"] = original
        items.append(Item(id=index, prompt=prompt, image=image, meta=meta))
    if overrides:
        raise BenchmarkError(f"{answer_overrides}: Index(es) {sorted(overrides)} are not in {path}")
    check_unique(items, str(path))
    return items


def score(items: list[Item], responses: dict[str, str], **other: Any) -> tuple[dict[str, Any], list[dict]]:
    """Pair accuracy (official), question accuracy, unparsed count and the number of complete pairs."""
    check_options("mmvp", other, OPTIONS)
    records = []
    for item, resp, missing in lookup(items, responses, "mmvp"):
        pred = extract_option(resp, item.meta["options"])
        rec = base_record(item, resp, missing, pred, pred == item.meta["answer"])
        rec.update(answer=item.meta["answer"], options=item.meta["options"], pair=item.meta["pair"])
        if item.meta.get("overridden"):
            rec.update(overridden=True, original_answer=item.meta["original_answer"])
        records.append(rec)
    by_index = {int(r["id"]): r for r in records}
    pairs = [(i, i + 1) for i in sorted(by_index) if i % 2 == 1 and i + 1 in by_index]
    pair_ok = [by_index[a]["correct"] and by_index[b]["correct"] for a, b in pairs]
    metrics = {
        "pair_accuracy": percent(sum(pair_ok), len(pair_ok)),
        "question_accuracy": percent(sum(r["correct"] for r in records), len(records)),
        "unparsed": sum(r["extracted"] is None for r in records),
        "pairs": len(pair_ok),
    }
    return metrics, records


def match(row: ForeignRow, ctx: MatchContext) -> list[str]:
    """The MMVP Index another tool's row answers."""
    if row.layout == "lmms-eval":
        f = row.fields
        index = f.get("Index", f.get("index"))
        if index is None:
            raise BenchmarkError(f"{row.where}: the lmms-eval sample's doc has no Index")
        return [str(index)]
    if row.layout == "vlmevalkit":
        if "offset" not in ctx.state:
            try:
                first = min(int(r.key or "") for r in ctx.rows)
            except ValueError as e:
                raise BenchmarkError(
                    f"{row.path}: VLMEvalKit's index column is not all integers ({e})"
                ) from e
            ctx.state["offset"] = 1 if first == 0 else 0  # a table numbered from 0 is Index - 1
        return [str(int(row.key or "") + ctx.state["offset"])]
    if row.key is None:
        raise BenchmarkError(f"{row.where}: no Index")
    return [row.key]


BENCHMARK = register_benchmark(
    Benchmark(
        name="mmvp",
        id_key="Index",
        load=load,
        score=score,
        max_new_tokens=32,
        options=OPTIONS,
        no_official="MMVP's official scorer asks GPT-4 to grade each answer; there is no offline equivalent",
        match=match,
    )
)
