"""GeoWorld held-out QA (registered as "qa"): `eval/qa.jsonl` lines {id, image, question, answer,
category}, image paths relative to the world root.

`data_dir` is the world root (the file is `file=`, default "eval/qa.jsonl"); the `eval/` folder itself
is accepted too. The answers are short and closed, so scoring is exact match of normalised short
answers, read by the answer's kind so that the dress of a right answer does not make it wrong:
- the question lists options "(a) … (b) …": the option letter (`extract_option`; the reference may
  be "(a)" or the option's text);
- yes/no answers: `extract_yes_no` ("Yes, there is." is yes);
- numeric answers (counts, math): `numbers_match` ("3 shapes", "30°");
- anything else (colours, shapes, directions): `normalise(response) == normalise(answer)`.
An empty response, or one of the first three kinds that cannot be read, is unparsed (and wrong).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from mllm.evaluation.extract import (
    extract_number,
    extract_option,
    extract_yes_no,
    is_number_answer,
    normalise,
    numbers_match,
    parse_options,
)

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

DEFAULT_FILE = "eval/qa.jsonl"
OPTIONS = ("file", "images")


def load(
    data_dir: Path, *, file: str = DEFAULT_FILE, images: str | Path | None = None, **other: Any
) -> list[Item]:
    """Items in file order; `images` defaults to the world root the image paths are relative to."""
    check_options("qa", other, OPTIONS)
    data_dir = Path(data_dir)
    path = data_dir / file
    root = data_dir
    if not path.is_file() and file == DEFAULT_FILE and (data_dir / "qa.jsonl").is_file():
        path, root = data_dir / "qa.jsonl", data_dir.parent  # given the eval/ folder itself
    if not path.is_file():
        raise FileNotFoundError(f"GeoWorld QA: {path} not found")
    img_root = Path(images) if images is not None else root
    items = []
    for n, row in read_json_lines(path):
        where = f"{path}:{n}"
        need_keys(row, ("id", "image", "question", "answer", "category"), where)
        ident = str(row["id"])
        image = image_file(img_root, row["image"], f"{where} (id {ident})")
        question, answer = str(row["question"]), str(row["answer"])
        options = parse_options(question[question.find("(a)") :]) if "(a)" in question else {}
        meta: dict[str, Any] = {"answer": answer, "category": str(row["category"])}
        if len(options) >= 2:
            truth = answer.strip().strip("()").lower()
            if truth not in options:
                truth = extract_option(answer, options) or ""
            if not truth:
                raise BenchmarkError(
                    f"{where} (id {ident}): answer {answer!r} is none of the options {options}"
                )
            meta.update(options=options, answer_letter=truth)
        items.append(Item(id=ident, prompt=question, image=image, meta=meta))
    check_unique(items, str(path))
    return items


def judge(item: Item, response: str) -> tuple[Any, bool]:
    """(extracted answer or None, correct) for one QA item, by the kind of its answer."""
    answer = item.meta["answer"]
    if "options" in item.meta:
        pred = extract_option(response, item.meta["options"])
        return pred, pred is not None and pred == item.meta["answer_letter"]
    if normalise(answer) in ("yes", "no"):
        pred = extract_yes_no(response)
        return pred, pred == normalise(answer)
    if is_number_answer(answer):
        value = extract_number(response)
        return value, value is not None and numbers_match(response, answer)
    pred = normalise(response) or None
    return pred, pred is not None and pred == normalise(answer)


def score(items: list[Item], responses: dict[str, str], **other: Any) -> tuple[dict[str, Any], list[dict]]:
    """Accuracy overall and per category (percent), unparsed count and n."""
    check_options("qa", other, OPTIONS)
    records = []
    per_cat: dict[str, list[bool]] = defaultdict(list)
    for item, resp, missing in lookup(items, responses, "qa"):
        pred, ok = judge(item, resp)
        rec = base_record(item, resp, missing, pred, ok)
        rec.update(answer=item.meta["answer"], category=item.meta["category"])
        records.append(rec)
        per_cat[item.meta["category"]].append(ok)
    metrics = {
        "accuracy": percent(sum(r["correct"] for r in records), len(records)),
        "per_category": {c: percent(sum(v), len(v)) for c, v in sorted(per_cat.items())},
        "unparsed": sum(r["extracted"] is None for r in records),
        "n": len(records),
    }
    return metrics, records


BENCHMARK = register_benchmark(
    Benchmark(
        name="qa",
        id_key="id",
        load=load,
        score=score,
        max_new_tokens=32,
        options=OPTIONS,
        no_official="GeoWorld QA is this project's own benchmark: its one rule is the official one",
    )
)
