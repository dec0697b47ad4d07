"""The benchmark registry and the model-free scoring path shared by every benchmark.

A benchmark is two pure functions: `load` turns the official files into `Item`s (checking every file
and image up front, so a broken copy fails before any GPU time is spent) and `score` turns
responses keyed by the benchmark's own ids into metrics plus the per-item records they were computed
from. Generation lives elsewhere; this half only reads files and strings, so any predictions file —
ours, another codebase's, a hand-written one in a test — is scored by exactly the same rules.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from encoders.registry import Registry
from mllm.data.images import ImageError, resolve_image


class BenchmarkError(ValueError):
    """A benchmark file, image or predictions file that cannot be used; the message names it."""


@dataclass
class Item:
    """One question as the benchmark defines it."""

    id: str  # the benchmark's own id (MMVP Index, MathVerse sample_index, POPE split/question_id, ...)
    prompt: str  # the text to ask, without the <image> marker (the runner adds it)
    image: Path | None  # absolute path of the image; None for text-only items
    meta: dict[str, Any] = field(default_factory=dict)  # whatever scoring needs; JSON-serialisable


@dataclass
class Benchmark:
    """A registry entry: how to load a benchmark's official files and how to score responses to it."""

    name: str
    id_key: str  # the id field of a predictions line for this benchmark
    load: Callable[..., list[Item]]  # load(data_dir: Path, **opts) -> items
    score: Callable[..., tuple[dict, list[dict]]]  # score(items, responses, **opts) -> (metrics, records)
    max_new_tokens: int = 32
    options: tuple[str, ...] = ()  # every option load or score understands (for help texts and checks)
    # Benchmarks not answered by generation (MMVP-VLM, retrieval: a contrastive model's similarities):
    # respond(model, items, batch_size=..., **opts) -> {id: response}, for a model of `model_kind`
    # (a key of mllm.families.FAMILIES). None: the runner generates answers with a MultimodalLM.
    respond: Callable[..., dict[str, str]] | None = None
    model_kind: str = "mllm"


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")


def register_benchmark(bench: Benchmark, replace: bool = False) -> Benchmark:
    """Add a benchmark under its name; a second one with the same name is an error unless `replace`,
    so two modules cannot silently shadow each other."""
    return BENCHMARKS.register(bench.name, bench, replace=replace, stacklevel=2)


def get_benchmark(name: str) -> Benchmark:
    return BENCHMARKS[name]


# --------------------------------------------------------------------------------------------------
# Helpers for benchmark modules
# --------------------------------------------------------------------------------------------------


def percent(num: float, den: float) -> float:
    """100 * num / den, and 0.0 for an empty set (a metric over nothing is reported, not a crash)."""
    return 100.0 * num / den if den else 0.0


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} not found")
    return path


def read_json_lines(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file; errors name file and line.

    A file holding one JSON array is accepted too (some public copies of JSONL benchmarks are
    re-saved that way); its items are numbered from 1.
    """
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}: not valid JSON: {e}") from e
        out = list(enumerate(rows, 1))
    else:
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{path}:{n}: not valid JSON: {e}") from e
    for n, row in out:
        if not isinstance(row, dict):
            raise BenchmarkError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
    return out


def need_keys(row: Mapping[str, Any], keys: Iterable[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise BenchmarkError(f"{where}: missing field(s) {missing}")


def image_file(root: Path, rel: Any, where: str) -> Path:
    """The image `rel` under `root`, which must exist; the error names the item and the file."""
    if not isinstance(rel, str) or not rel:
        raise BenchmarkError(f"{where}: image field {rel!r} is not a file name")
    try:
        path = resolve_image(root, rel)
    except ImageError as e:
        raise BenchmarkError(f"{where}: {e}") from e
    if not path.is_file():
        raise BenchmarkError(f"{where}: image {path} not found")
    return path


def check_unique(items: list[Item], where: str) -> None:
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise BenchmarkError(f"{where}: duplicate id {it.id!r}")
        seen.add(it.id)


def lookup(items: list[Item], responses: Mapping[str, str], name: str) -> list[tuple[Item, str, bool]]:
    """(item, response, missing) for every item, in item order.

    Every item is kept: one with no response gets "" and counts as unparsed, so a crashed or
    truncated run can never score higher by dropping the items it failed on. A response whose id is
    not an item is an error — it means predictions from another file, split or id scheme.
    """
    known = {it.id for it in items}
    unknown = [k for k in responses if k not in known]
    if unknown:
        raise BenchmarkError(f"{len(unknown)} response id(s) not in benchmark {name!r}: {_show(unknown)}")
    return [(it, str(responses.get(it.id, "")), it.id not in responses) for it in items]


def _show(ids: list[str], k: int = 10) -> str:
    shown = ", ".join(repr(i) for i in ids[:k])
    return shown + (f", ... ({len(ids) - k} more)" if len(ids) > k else "")


# --------------------------------------------------------------------------------------------------
# Predictions in, report out
# --------------------------------------------------------------------------------------------------


def read_predictions(path: str | Path, id_key: str) -> dict[str, str]:
    """{id: response} from a JSONL predictions file of `{id_key: ..., "response": ...}` lines.

    Ids are compared as strings (MMVP's Index may be written 1 or "1"). A duplicate id is an error
    rather than last-one-wins: two answers to one question mean a merge went wrong, and picking one
    would make the score depend on line order.
    """
    path = Path(path)
    require_file(path, "predictions")
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for n, row in read_json_lines(path):
        need_keys(row, (id_key, "response"), f"{path}:{n}")
        ident, resp = row[id_key], row["response"]
        if isinstance(ident, bool) or not isinstance(ident, (str, int)):
            raise BenchmarkError(f"{path}:{n}: {id_key} must be a string or an integer, got {ident!r}")
        if not isinstance(resp, str):
            raise BenchmarkError(f"{path}:{n}: response must be a string, got {type(resp).__name__}")
        key = str(ident)
        if key in out:
            raise BenchmarkError(f"{path}:{n}: duplicate {id_key} {key!r} (first on line {first_line[key]})")
        out[key] = resp
        first_line[key] = n
    return out


def write_report(
    out_json: str | Path,
    metrics: Mapping[str, Any],
    records: list[dict[str, Any]],
    meta: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """FILE.json (the metrics, indent 1) and FILE.jsonl (one record per item) side by side.

    The records are the evidence for the metrics: every number in FILE.json can be recomputed from
    FILE.jsonl, and a surprising score can be read item by item. `meta` (benchmark, model, options)
    is added to FILE.json under "meta" — the block `mllm report` reads — without touching the metrics.
    """
    if meta is not None:
        metrics = {**metrics, "meta": dict(meta)}
    out = Path(out_json)
    json_path = out if out.suffix == ".json" else out.with_name(out.name + ".json")
    jsonl_path = json_path.with_suffix(".jsonl")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(
        json.dumps(metrics, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8"
    )
    with open(jsonl_path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    return json_path, jsonl_path


def check_options(name: str, extra: Mapping[str, Any], options: Iterable[str]) -> None:
    """Refuse options the benchmark does not have.

    Callers pass one options dict to both `load` and `score` (each ignores the other's), so each half
    accepts `**extra` and checks it here: an option neither half knows — a typo such as `box_fromat`
    — is an error instead of silently scoring with the default.
    """
    known = set(options)
    stray = sorted(k for k in extra if k not in known)
    if stray:
        raise TypeError(f"benchmark {name!r} has no option(s) {stray}; its options are {sorted(known)}")


def score_file(
    name: str, data_dir: str | Path, predictions_path: str | Path, **opts: Any
) -> tuple[dict[str, Any], list[dict]]:
    """Score a predictions file against a benchmark's official files, with no model in the loop.

    Ids in the predictions that the benchmark does not have are an error naming them; benchmark
    items with no prediction stay in, unparsed (records mark them "missing").
    """
    bench = get_benchmark(name)
    items = bench.load(Path(data_dir), **opts)
    responses = read_predictions(predictions_path, bench.id_key)
    known = {it.id for it in items}
    unknown = [k for k in responses if k not in known]
    if unknown:
        raise BenchmarkError(
            f"{predictions_path}: {len(unknown)} {bench.id_key}(s) not in benchmark {name!r} at {data_dir}: "
            f"{_show(unknown)}"
        )
    return bench.score(items, responses, **opts)


def score_predictions(
    name: str, data_dir: str | Path, predictions_path: str | Path, out_json: str | Path | None, **opts: Any
) -> dict[str, Any]:
    """`score_file`, writing the report when `out_json` is given; returns the metrics."""
    metrics, records = score_file(name, data_dir, predictions_path, **opts)
    if out_json is not None:
        meta = {
            "benchmark": name,
            "data": str(data_dir),
            "predictions": str(predictions_path),
            "options": opts,
        }
        write_report(out_json, metrics, records, meta=meta)
    return metrics


def base_record(item: Item, response: str, missing: bool, extracted: Any, correct: bool) -> dict[str, Any]:
    """The fields every benchmark's records start with, in a fixed order."""
    return {
        "id": item.id,
        "prompt": item.prompt,
        "response": response,
        "extracted": extracted,
        "correct": bool(correct),
        "missing": missing,
    }
