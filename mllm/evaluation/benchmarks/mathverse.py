"""MathVerse testmini (Zhang et al., 2024): each problem in five image versions plus Text Only.

Official layout: `testmini.json` (a list of {sample_index, problem_index, problem_version, question,
image, answer, question_type: multi-choice|free-form, metadata, query_wo, query_cot}), optional
`testmini_text_only.json` (same fields, `image` ""), figures under `images/`.

Ids: the image versions use `sample_index`; Text Only items use "text_only/{sample_index}", because
the text-only file numbers its samples from 1 again and would collide with testmini's.

Prompt: `query_wo` (the paper's primary, direct-answer setting); `cot=True` gives `query_cot`, which
needs a larger generation budget than this benchmark's default `max_new_tokens`.

Scoring is rule-based instead of the official GPT-4 extract-and-judge (which has no offline
equivalent, so MathVerse has one rule; docs/evaluation.md tabulates every answer shape):
- multi-choice: the option letter via `extract_option` against the choices parsed from the question
  text ("Choices:\\nA:… B:…"), so an answer given as a value ("50°") maps back to its letter. Vision
  Only questions carry their choices in the figure, so they borrow them from another version of the
  same problem (then `metadata.choices`, then bare letters A–E).
- free-form: a single-number answer — units and their exponents, fractions, roots, π, degrees and a
  label ("Area $=113.1 \\mathrm{~cm}^{2}$") around one value — is compared by value
  (`numbers_match`, rounding tolerated), so the bare value the prompt asks for ("720" for
  "720 \\mathrm{cm}^3") scores; anything else (words, intervals, expressions) by
  `text_answer_matches`: the short answer equal to it, or the answer named in the response's last
  statement and not negated ("The function is even." for "even"). A reference answer written twice
  on two lines ("-4.9\\n-4.9") is one answer.

Other tools' files: LLaVA-style answers (`question_id` = sample_index), lmms-eval samples and
MathVerse's own output file (`sample_index`; a `problem_version` of Text Only means the text-only
file's id), VLMEvalKit's table (`index` as sample_index, its `answer` checked against ours).

Metrics (percent): accuracy per version, "all" = the mean of the five image-version accuracies
(Text Only excluded, as in the paper; over the versions present when a subset is scored),
"text_only" (None without the text-only file) and the unparsed count over every item.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mllm.evaluation.extract import (
    extract_answer_text,
    extract_number,
    extract_option,
    is_number_answer,
    numbers_match,
    parse_choices,
    text_answer_matches,
)

from .core import (
    Benchmark,
    BenchmarkError,
    ForeignRow,
    Item,
    MatchContext,
    base_record,
    check_options,
    check_unique,
    image_file,
    lookup,
    need_keys,
    percent,
    register_benchmark,
    require_file,
)

VERSIONS: tuple[str, ...] = (
    "Text Dominant",
    "Text Lite",
    "Vision Intensive",
    "Vision Dominant",
    "Vision Only",
)
TEXT_ONLY = "Text Only"
DEFAULT_LETTERS = "ABCDE"
OPTIONS = ("cot", "images", "text_only", "rel_tol")
_FIELDS = ("sample_index", "problem_version", "question", "image", "answer", "question_type", "query_wo")


def _read_list(path: Path) -> list[dict[str, Any]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise BenchmarkError(f"{path}: expected a JSON list of objects")
    return rows


def _problem_choices(rows: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Choices of each problem_index, from the first version whose question text lists them."""
    out: dict[str, dict[str, str]] = {}
    for r in rows:
        pid = str(r.get("problem_index", ""))
        if pid and pid not in out:
            got = parse_choices(str(r.get("question", "")))
            if got:
                out[pid] = got
    return out


def _choices(row: dict[str, Any], by_problem: dict[str, dict[str, str]]) -> dict[str, str]:
    got = parse_choices(str(row.get("question", "")))
    if got:
        return got
    got = by_problem.get(str(row.get("problem_index", "")), {})
    if got:
        return got
    meta = row.get("metadata")
    listed = meta.get("choices") if isinstance(meta, dict) else None
    if isinstance(listed, list) and listed:
        return {chr(ord("A") + i): str(v) for i, v in enumerate(listed[:26])}
    return dict.fromkeys(DEFAULT_LETTERS, "")


def load(
    data_dir: Path,
    *,
    cot: bool = False,
    images: str | Path | None = None,
    text_only: bool = True,
    **other: Any,
) -> list[Item]:
    """testmini items (then Text Only ones when the file is there and `text_only`), in file order."""
    check_options("mathverse", other, OPTIONS)
    data_dir = Path(data_dir)
    img_root = Path(images) if images is not None else data_dir / "images"
    files = [(require_file(data_dir / "testmini.json", "MathVerse"), False)]
    if text_only and (data_dir / "testmini_text_only.json").is_file():
        files.append((data_dir / "testmini_text_only.json", True))
    items: list[Item] = []
    for path, is_text_only in files:
        rows = _read_list(path)
        by_problem = _problem_choices(rows)
        for n, row in enumerate(rows, 1):
            sid = str(row.get("sample_index", f"#{n}"))
            where = f"{path} (item {n}, sample_index {sid})"
            need_keys(row, _FIELDS + (("query_cot",) if cot else ()), where)
            qtype = str(row["question_type"])
            if qtype not in ("multi-choice", "free-form"):
                raise BenchmarkError(f"{where}: question_type {qtype!r} is not multi-choice/free-form")
            version = str(row["problem_version"])
            if row["image"]:
                image = image_file(img_root, row["image"], where)
            elif is_text_only or version == TEXT_ONLY:
                image = None
            else:
                raise BenchmarkError(f"{where}: {version} item has no image")
            meta: dict[str, Any] = {
                "answer": str(row["answer"]).strip(),
                "question_type": qtype,
                "version": TEXT_ONLY if is_text_only else version,
                "problem_index": str(row.get("problem_index", "")),
                "text_only": is_text_only,
            }
            if qtype == "multi-choice":
                meta["choices"] = _choices(row, by_problem)
            ident = f"text_only/{sid}" if is_text_only else sid
            prompt = str(row["query_cot"] if cot else row["query_wo"])
            items.append(Item(id=ident, prompt=prompt, image=image, meta=meta))
    check_unique(items, str(data_dir))
    return items


def clean_answer(answer: str) -> str:
    """The reference answer as one answer: testmini writes a few twice, one per line ("-4.9\\n-4.9")."""
    lines = list(dict.fromkeys(ln.strip() for ln in answer.strip().splitlines() if ln.strip()))
    return lines[0] if len(lines) == 1 else answer.strip()


def _truth_letter(answer: str, choices: dict[str, str]) -> str:
    """The answer as a choice key: "B", "(B)", "b" or the choice's own text."""
    a = answer.strip().strip("()").strip()
    for k in choices:
        if a.lower() == k.lower():
            return k
    got = extract_option(answer, choices)
    return got if got is not None else a


def judge(item: Item, response: str, rel_tol: float = 1e-3) -> tuple[Any, bool]:
    """(extracted answer or None, correct) for one MathVerse item."""
    answer = clean_answer(item.meta["answer"])
    if item.meta["question_type"] == "multi-choice":
        choices = item.meta["choices"]
        pred = extract_option(response, choices)
        return pred, pred is not None and pred == _truth_letter(answer, choices)
    if is_number_answer(answer):
        value = extract_number(response)
        return value, value is not None and numbers_match(response, answer, rel_tol=rel_tol)
    text = extract_answer_text(response)
    return text, text is not None and text_answer_matches(response, answer)


def score(
    items: list[Item], responses: dict[str, str], *, rel_tol: float = 1e-3, **other: Any
) -> tuple[dict[str, Any], list[dict]]:
    """Accuracy per version, the five-version mean "all", text_only and unparsed."""
    check_options("mathverse", other, OPTIONS)
    records = []
    per_version: dict[str, list[bool]] = {}
    for item, resp, missing in lookup(items, responses, "mathverse"):
        pred, ok = judge(item, resp, rel_tol)
        rec = base_record(item, resp, missing, pred, ok)
        rec.update(
            answer=item.meta["answer"],
            question_type=item.meta["question_type"],
            version=item.meta["version"],
            problem_index=item.meta["problem_index"],
        )
        records.append(rec)
        per_version.setdefault(item.meta["version"], []).append(ok)
    order = [v for v in VERSIONS if v in per_version] + sorted(
        v for v in per_version if v not in VERSIONS and v != TEXT_ONLY
    )
    versions = {v: percent(sum(per_version[v]), len(per_version[v])) for v in order}
    five = [versions[v] for v in VERSIONS if v in versions]
    text_only = per_version.get(TEXT_ONLY)
    metrics = {
        "all": sum(five) / len(five) if five else None,
        "versions": versions,
        "text_only": percent(sum(text_only), len(text_only)) if text_only else None,
        "unparsed": sum(r["extracted"] is None for r in records),
    }
    return metrics, records


def match(row: ForeignRow, ctx: MatchContext) -> list[str]:
    """The item another tool's row answers: its sample_index, under "text_only/" for a Text Only row."""
    f = row.fields
    if row.layout == "lmms-eval":
        sid = f.get("sample_index")
    elif row.layout == "vlmevalkit":
        sid = f.get("sample_index", row.key)
    else:
        sid = row.key
    if sid is None or sid == "":
        raise BenchmarkError(f"{row.where}: no sample_index")
    sid = str(sid).strip()
    if str(f.get("problem_version", "")).strip() == TEXT_ONLY and not sid.startswith("text_only/"):
        sid = f"text_only/{sid}"
    item = ctx.by_id.get(sid)
    theirs = f.get("answer") if row.layout == "vlmevalkit" else None
    if item is not None and theirs is not None and str(theirs).strip() != item.meta["answer"]:
        ours = item.meta["answer"]
        if not (is_number_answer(ours) and numbers_match(str(theirs), ours, rel_tol=1e-9)):
            raise BenchmarkError(
                f"{row.where}: VLMEvalKit's row {row.key} has answer {theirs!r}, but MathVerse's {sid} has "
                f"{ours!r}: its index is not MathVerse's sample_index"
            )
    return [sid]


BENCHMARK = register_benchmark(
    Benchmark(
        name="mathverse",
        id_key="sample_index",
        load=load,
        score=score,
        max_new_tokens=128,
        options=OPTIONS,
        no_official="MathVerse's official scorer extracts and judges answers with GPT-4; there is no "
        "offline equivalent",
        match=match,
    )
)
