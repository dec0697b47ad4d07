"""Predictions files, ours and other tools', read into {item id: response} and scored.

A predictions file is recognised by its first row, among the layouts registered in
`PREDICTION_LAYOUTS` (tried in registration order):

- `mllm`: our JSONL, `{<benchmark id>: ..., "response": ...}` (what `mllm eval` records carry);
- `llava`: LLaVA's answers files (`model_vqa*.py`: `{"question_id": 12, "prompt", "text", "answer_id",
  "model_id", "metadata"}`) and MMVP's `evaluate_mllm.py` output (`question_id`, `response`);
- `lmms-eval`: `lmms-eval --log_samples` output (`samples_<task>.jsonl` lines `{"doc_id", "doc",
  "target", "arguments", "resps", "filtered_resps", ...}`, or an older `<task>.json` with a `logs` list);
- `mathverse`: MathVerse's own output file (the testmini rows with a `model_answer`);
- `vlmevalkit`: VLMEvalKit's prediction tables (`<model>_<dataset>.xlsx` or `.tsv`: the dataset's
  columns, `index` first, plus `prediction`); `.tsv` needs nothing, `.xlsx` needs openpyxl
  (`pip install 'mllm[eval]'`).

Each layout turns its rows into `ForeignRow`s; the benchmark maps those to its own ids
(`Benchmark.match`, as the tool that wrote the file numbered its questions: POPE's split per question,
lmms-lab's RefCOCO sentence per row, ...). Nothing is scored from a file that was not read whole:
a row of another layout, a row that matches no question, or two answers to one question is an
error naming the file and line, and an unknown layout is an error listing the accepted ones.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encoders.registry import Registry

from .core import (
    Benchmark,
    BenchmarkError,
    ForeignRow,
    Item,
    MatchContext,
    default_match,
    get_benchmark,
    need_keys,
    read_json_lines,
    require_file,
    resolve_rule,
    show_ids,
    write_report,
)


@dataclass(frozen=True)
class PredictionLayout:
    """A registry entry: how to recognise one tool's predictions rows and read one into a `ForeignRow`."""

    name: str
    doc: str  # one line: which tool writes it and what a row looks like (errors and docs list it)
    claims: Callable[[Mapping[str, Any], Benchmark], bool]  # claims(first row, bench): is it this layout?
    read: Callable[[Path, int, Mapping[str, Any], Benchmark], ForeignRow]  # read(path, line, row, bench)
    table: bool = False  # rows come from a tsv/xlsx table, not JSON


PREDICTION_LAYOUTS: Registry[PredictionLayout] = Registry("predictions layout")


def register_layout(layout: PredictionLayout) -> PredictionLayout:
    """Add a layout; it is tried after those registered before it."""
    return PREDICTION_LAYOUTS.register(layout.name, layout, stacklevel=2)


def _id(value: Any, field: str, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BenchmarkError(f"{where}: {field} must be a string or an integer, got {value!r}")
    return str(value)


def _text(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise BenchmarkError(f"{where}: {field} must be a string, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------------------
# The layouts
# --------------------------------------------------------------------------------------------------


def _read_mllm(path: Path, line: int, row: Mapping[str, Any], bench: Benchmark) -> ForeignRow:
    where = f"{path}:{line}"
    need_keys(row, (bench.id_key, "response"), where)
    key = _id(row[bench.id_key], bench.id_key, where)
    return ForeignRow(path, line, "mllm", key, row, _text(row["response"], "response", where))


def _read_llava(path: Path, line: int, row: Mapping[str, Any], bench: Benchmark) -> ForeignRow:
    where = f"{path}:{line}"
    field = "text" if "text" in row else "response"
    need_keys(row, ("question_id", field), where)
    key = _id(row["question_id"], "question_id", where)
    return ForeignRow(path, line, "llava", key, row, _text(row[field], field, where))


def _lmms_response(row: Mapping[str, Any], where: str) -> str:
    """The answer of a generate_until sample: filtered_resps[0] (resps[0][0] when no filter ran)."""
    value: Any = row["filtered_resps"] if "filtered_resps" in row else row["resps"]
    for _ in range(2):  # [["text"]] (resps) or ["text"] (filtered_resps)
        if isinstance(value, list):
            value = value[0] if value else ""
    return _text(value, "filtered_resps[0]", where)


def _read_lmms(path: Path, line: int, row: Mapping[str, Any], bench: Benchmark) -> ForeignRow:
    where = f"{path}:{line}"
    need_keys(row, ("doc_id", "doc"), where)
    if not isinstance(row["doc"], dict):
        raise BenchmarkError(f"{where}: doc must be an object, got {type(row['doc']).__name__}")
    key = _id(row["doc_id"], "doc_id", where)
    fields = {**row["doc"], "doc_id": row["doc_id"]}
    return ForeignRow(path, line, "lmms-eval", key, fields, _lmms_response(row, where))


def _read_mathverse(path: Path, line: int, row: Mapping[str, Any], bench: Benchmark) -> ForeignRow:
    where = f"{path}:{line}"
    key = _id(row["sample_index"], "sample_index", where)
    answer = row.get("model_answer")
    # MathVerse's extract script scores a missing answer (a model that refused) as ""; so do we.
    return ForeignRow(
        path, line, "mathverse", key, row, "" if answer is None else _text(answer, "model_answer", where)
    )


def _read_vlmevalkit(path: Path, line: int, row: Mapping[str, Any], bench: Benchmark) -> ForeignRow:
    where = f"{path}:{line}"
    index = row.get("index")
    if isinstance(index, float) and index.is_integer():  # xlsx numbers come back as floats
        index = int(index)
    if index is None or index == "":
        raise BenchmarkError(f"{where}: no index")
    pred = row.get("prediction")
    if pred is None or (isinstance(pred, float) and math.isnan(pred)):
        pred = ""
    # VLMEvalKit itself reads every prediction as str(x); a cell that a spreadsheet turned into a number
    # ("12") is read the same way.
    if isinstance(pred, float) and pred.is_integer():
        pred = int(pred)
    return ForeignRow(path, line, "vlmevalkit", str(index).strip(), row, str(pred))


register_layout(
    PredictionLayout(
        "mllm",
        'mllm\'s JSONL: {<benchmark id>: ..., "response": ...} per line',
        lambda row, bench: bench.id_key in row and "response" in row and "doc_id" not in row,
        _read_mllm,
    )
)
register_layout(
    PredictionLayout(
        "llava",
        'LLaVA\'s answers file: {"question_id": 12, "text": ...} per line (MMVP\'s evaluate_mllm.py: '
        '"response")',
        lambda row, bench: (
            "question_id" in row and ("text" in row or "response" in row) and "doc_id" not in row
        ),
        _read_llava,
    )
)
register_layout(
    PredictionLayout(
        "lmms-eval",
        'lmms-eval --log_samples: {"doc_id", "doc", "filtered_resps", ...} per line '
        '(or a JSON object with a "logs" list)',
        lambda row, bench: "doc_id" in row and ("filtered_resps" in row or "resps" in row),
        _read_lmms,
    )
)
register_layout(
    PredictionLayout(
        "mathverse",
        'MathVerse\'s output file: the testmini rows with "model_answer"',
        lambda row, bench: "sample_index" in row and "model_answer" in row,
        _read_mathverse,
    )
)
register_layout(
    PredictionLayout(
        "vlmevalkit",
        "VLMEvalKit's prediction table (.tsv, or .xlsx with openpyxl): columns index, ..., prediction",
        lambda row, bench: "index" in row and "prediction" in row,
        _read_vlmevalkit,
        table=True,
    )
)


# --------------------------------------------------------------------------------------------------
# Reading a file's rows
# --------------------------------------------------------------------------------------------------


def _is_json_line(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def _json_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line, object) of a JSONL file or a JSON list; an lmms-eval JSON object's `logs` list."""
    text = path.read_text(encoding="utf-8-sig")
    head = text.lstrip()
    if not head.startswith("{") or _is_json_line(head.split("\n", 1)[0]):
        rows = read_json_lines(path)
        if not (len(rows) == 1 and "logs" in rows[0][1] and "doc_id" not in rows[0][1]):
            return rows
        whole: Any = rows[0][1]  # an lmms-eval <task>.json written on one line
    else:
        try:  # not JSON lines: one JSON object over many lines (older lmms-eval: {"args", ..., "logs": [...]})
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}: not valid JSON or JSON lines: {e}") from e
    logs = whole.get("logs") if isinstance(whole, dict) else None
    if not isinstance(logs, list):
        raise BenchmarkError(f'{path}: a JSON object without a "logs" list is not a predictions file')
    for n, row in enumerate(logs):
        if not isinstance(row, dict):
            raise BenchmarkError(f"{path}: logs[{n}] is not an object")
    return list(enumerate(logs, 1))


def _tsv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    # VLMEvalKit's tables may keep the base64 image column: far past csv's default field limit.
    csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 2**31 - 1)))
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter="\t")
        start = 2  # line 1 is the header
        try:
            for row in reader:
                yield start, {(k or "").strip(): v for k, v in row.items()}
                start = reader.line_num + 1
        except csv.Error as e:
            raise BenchmarkError(f"{path}:{reader.line_num}: not a readable tsv row: {e}") from e


def _xlsx_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        # Optional dependency (the `eval` extra), imported only when an .xlsx is read.
        from openpyxl import load_workbook
    except ImportError as e:
        raise BenchmarkError(
            f"{path}: reading .xlsx needs openpyxl (pip install 'mllm[eval]'), or save the table as .tsv"
        ) from e
    try:
        book = load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # noqa: BLE001 - openpyxl raises many kinds on a bad file; all mean "unreadable"
        raise BenchmarkError(f"{path}: not a readable .xlsx file: {e}") from e
    try:
        rows = book.worksheets[0].iter_rows(values_only=True)
        header = [str(h).strip() if h is not None else "" for h in next(rows, ())]
        for n, values in enumerate(rows, 2):
            if any(v is not None for v in values):
                yield n, dict(zip(header, values))
    finally:
        book.close()


def read_rows(path: str | Path, bench: Benchmark) -> tuple[PredictionLayout, list[ForeignRow]]:
    """Every row of a predictions file, in the layout its first row is recognised as.

    Errors name the file and line: an unreadable line, a row the layout cannot read (a missing field, a
    response that is not a string), an unknown layout (listing the accepted ones), an empty file."""
    path = Path(path)
    require_file(path, "predictions")
    suffix = path.suffix.lower()
    table = suffix in (".tsv", ".xlsx")
    raw = list(_xlsx_rows(path) if suffix == ".xlsx" else _tsv_rows(path) if table else _json_rows(path))
    if not raw:
        raise BenchmarkError(f"{path}: no predictions in the file")
    first_line, first = raw[0]
    layout = next(
        (lay for lay in PREDICTION_LAYOUTS.values() if lay.table == table and lay.claims(first, bench)), None
    )
    if layout is None:
        accepted = "; ".join(f"{lay.name}: {lay.doc}" for lay in PREDICTION_LAYOUTS.values())
        raise BenchmarkError(
            f"{path}:{first_line}: a row with fields {sorted(first)[:12]} is in no predictions layout "
            f"read for benchmark {bench.name!r}; accepted: {accepted}"
        )
    return layout, [layout.read(path, n, row, bench) for n, row in raw]


def read_responses(
    bench: Benchmark,
    items: list[Item],
    path: str | Path,
    options: Mapping[str, Any] | None = None,
    data: str | Path | None = None,
) -> tuple[str, dict[str, str]]:
    """(layout name, {item id: response}) from a predictions file of any registered layout.

    Every row must match an item (`bench.match`, else `default_match`); rows that match none are
    listed in one error, and a second answer to an item is an error naming both lines."""
    layout, rows = read_rows(path, bench)
    ctx = MatchContext(bench, items, dict(options or {}), rows)
    match = bench.match or default_match
    responses: dict[str, str] = {}
    first: dict[str, int] = {}
    unknown: list[str] = []
    for row in rows:
        for ident in match(row, ctx):
            if ident not in ctx.by_id:
                unknown.append(ident)
            elif ident in responses:
                raise BenchmarkError(
                    f"{row.where}: duplicate {bench.id_key} {ident!r} (first on line {first[ident]})"
                )
            else:
                responses[ident] = row.response
                first[ident] = row.line
    if unknown:
        at = f" at {data}" if data is not None else ""
        raise BenchmarkError(
            f"{path}: {len(unknown)} {bench.id_key}(s) not in benchmark {bench.name!r}{at}: {show_ids(unknown)}"
        )
    return layout.name, responses


# --------------------------------------------------------------------------------------------------
# Scoring a file
# --------------------------------------------------------------------------------------------------


@dataclass
class ScoredFile:
    """What scoring a predictions file gives: the metrics and records, and how they were obtained."""

    metrics: dict[str, Any]
    records: list[dict]
    layout: str  # the predictions layout the file was read as
    rule: str  # the scoring rule that produced the metrics


def score_predictions_file(
    name: str, data_dir: str | Path, predictions_path: str | Path, **opts: Any
) -> ScoredFile:
    """Score a predictions file (any registered layout) against a benchmark's official files, with no
    model in the loop, under the rule `opts` pick (`rule=`, the benchmark's default otherwise).

    Ids in the predictions that the benchmark does not have are an error naming them; benchmark
    items with no prediction stay in, unparsed (records mark them "missing")."""
    bench = get_benchmark(name)
    rule, opts = resolve_rule(bench, opts)
    items = bench.load(Path(data_dir), **opts)
    layout, responses = read_responses(bench, items, predictions_path, opts, data=data_dir)
    metrics, records = bench.score(items, responses, **opts)
    return ScoredFile(metrics, records, layout, rule)


def score_file(
    name: str, data_dir: str | Path, predictions_path: str | Path, **opts: Any
) -> tuple[dict[str, Any], list[dict]]:
    """`score_predictions_file`'s metrics and records."""
    scored = score_predictions_file(name, data_dir, predictions_path, **opts)
    return scored.metrics, scored.records


def score_predictions(
    name: str, data_dir: str | Path, predictions_path: str | Path, out_json: str | Path | None, **opts: Any
) -> dict[str, Any]:
    """`score_predictions_file`, writing the report when `out_json` is given; returns the metrics."""
    scored = score_predictions_file(name, data_dir, predictions_path, **opts)
    if out_json is not None:
        meta = {
            "benchmark": name,
            "data": str(data_dir),
            "predictions": str(predictions_path),
            "predictions_layout": scored.layout,
            "rule": scored.rule,
            "options": opts,
        }
        write_report(out_json, scored.metrics, scored.records, meta=meta)
    return scored.metrics
