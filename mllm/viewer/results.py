"""An `mllm eval` result as the viewer reads it: metrics and `meta` (FILE.json), per-item records
(FILE.jsonl beside it), and the items' images.

Records carry what was asked, answered, extracted and scored, but not the image: that stays where the
benchmark's folder keeps it. The viewer finds it the way `mllm eval` did, by loading the benchmark named
in `meta.benchmark` from `meta.data` with the result's options, so any benchmark layout `mllm eval`
reads is one the viewer can show. A folder that has moved is named again with `--data`; one that cannot
be loaded leaves the report without pictures rather than without a report.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mllm.evaluation.benchmarks import get_benchmark, resolve_rule


@dataclass
class EvalResult:
    path: Path  # the metrics JSON
    label: str  # how the report names it (A, B, ... go beside it)
    metrics: dict[str, Any]  # the metrics without meta
    meta: dict[str, Any]
    records: list[dict[str, Any]]
    by_id: dict[str, dict[str, Any]] = field(default_factory=dict)
    tag: str = "A"  # its letter in its benchmark's section (panels' columns, answer rows)

    def __post_init__(self) -> None:
        self.by_id = {str(r.get("id")): r for r in self.records}

    @property
    def benchmark(self) -> str:
        return str(self.meta.get("benchmark", "?"))


def load_result(path: str | Path) -> EvalResult:
    """FILE.json and FILE.jsonl; a one-line error naming the file for anything else."""
    path = Path(path)
    if path.suffix == ".jsonl":
        path = path.with_suffix(".json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable `mllm eval` metrics JSON ({e})") from e
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("meta"), dict)
        or "benchmark" not in data["meta"]
    ):
        raise ValueError(f"{path}: no meta.benchmark (was it written by `mllm eval`?)")
    jsonl = path.with_suffix(".jsonl")
    if not jsonl.is_file():
        raise FileNotFoundError(
            f"{jsonl}: the per-item records `mllm eval` writes beside {path.name} are missing"
        )
    records = []
    for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{jsonl}:{n}: not valid JSON ({e})") from e
    meta = data.pop("meta")
    return EvalResult(path=path, label=_label(path, meta), metrics=data, meta=meta, records=records)


def _label(path: Path, meta: dict[str, Any]) -> str:
    """The model's folder, shortened to its last parts (runs/x/run/instruct/final -> x/run/instruct), else
    the predictions file, else the result's file name."""
    if meta.get("model"):
        parts = [p for p in Path(str(meta["model"])).parts if p != "/"]
        if len(parts) > 1 and parts[-1] == "final":  # a stage's final model: the stage names it
            parts = parts[:-1]
        return "/".join(parts[-3:])
    if meta.get("predictions"):
        return Path(str(meta["predictions"])).name
    return path.stem


def unique_labels(results: list[EvalResult]) -> None:
    """Results named alike (two evaluations of one model) get their file names beside the label."""
    seen: dict[str, int] = {}
    for r in results:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in results:
        if seen[r.label] > 1:
            r.label = f"{r.label} ({r.path.name})"


def data_folder(result: EvalResult) -> Path:
    """`meta.data` as `mllm eval` was given it; a relative one that is not there from here is tried from
    the result's own folder too (an eval run in one folder, viewed from another)."""
    folder = Path(str(result.meta.get("data", "")))
    if not folder.is_absolute() and not folder.exists() and (result.path.parent / folder).exists():
        return result.path.parent / folder
    return folder


@dataclass(frozen=True)
class ItemInfo:
    image: Path | None
    meta: dict[str, Any]


def load_items(result: EvalResult, data: str | Path | None = None) -> dict[str, ItemInfo]:
    """The benchmark's items by id, loaded as `mllm eval` loaded them (from `data` if given, else
    `meta.data`); {} with a warning on stderr when the folder cannot be loaded."""
    folder = Path(data) if data is not None else data_folder(result)
    try:
        bench = get_benchmark(result.benchmark)
        _, options = resolve_rule(bench, dict(result.meta.get("options") or {}))
        items = bench.load(folder, **options)
    except Exception as e:  # noqa: BLE001 - any failure to load: a report without images, and why
        print(
            f"mllm view: {result.path}: no images ({result.benchmark} not loadable from {folder}: {e}); "
            "name the folder with --data",
            file=sys.stderr,
        )
        return {}
    return {it.id: ItemInfo(it.image, dict(it.meta)) for it in items}


def side_file(result: EvalResult, name: str, data: str | Path | None = None) -> Any:
    """A JSON file beside the benchmark's files (GeoWorld's `patterns.json`), or None."""
    folder = Path(data) if data is not None else data_folder(result)
    path = folder / name
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None
