"""The benchmark registry and the model-free scoring path shared by every benchmark.

A benchmark is two pure functions: `load` turns the official files into `Item`s (checking every file
and image up front, so a broken copy fails before any GPU time is spent) and `score` turns
responses keyed by the benchmark's own ids into metrics plus the per-item records they were computed
from. Generation lives elsewhere; this half only reads files and strings, so any predictions file —
ours, another codebase's, a hand-written one in a test — is scored by exactly the same rules.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from encoders.registry import Registry
from mllm.data.images import ImageError, resolve_image

DEFAULT_RULE = "mllm"  # the project's own scoring rules, every benchmark's default (docs/evaluation.md)


class BenchmarkError(ValueError):
    """A benchmark file, image or predictions file that cannot be used; the message names it."""


class OptionError(BenchmarkError, TypeError):
    """A benchmark option the benchmark does not have, or a value it does not take (a rule it lacks).

    A `TypeError` too, as an unexpected keyword argument is, so callers that caught that keep working;
    a `BenchmarkError` (a `ValueError`) so the command line reports it in one line."""


@dataclass
class Item:
    """One question as the benchmark defines it."""

    id: str  # the benchmark's own id (MMVP Index, MathVerse sample_index, POPE split/question_id, ...)
    prompt: str  # the text to ask, without the <image> marker (the runner adds it)
    image: Path | None  # absolute path of the image; None for text-only items
    meta: dict[str, Any] = field(default_factory=dict)  # whatever scoring needs; JSON-serialisable


@dataclass(frozen=True)
class ForeignRow:
    """One answer of a predictions file, as its layout wrote it, before it is mapped to an item id."""

    path: Path
    line: int  # the line (JSON, tsv) or row (xlsx) of the file it was read from, for errors
    layout: str  # the `PredictionLayout` that read it (mllm, llava, lmms-eval, vlmevalkit, mathverse)
    key: str | None  # the layout's own id of the row (question_id, doc_id, index), as a string
    fields: Mapping[str, Any]  # the row's fields (lmms-eval: its doc, plus doc_id)
    response: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class MatchContext:
    """What a benchmark's `match` sees besides the row: the items, the options and every row of the file
    (a positional mapping, LLaVA's for POPE, needs the order), plus scratch state for one file."""

    bench: Benchmark
    items: list[Item]
    options: Mapping[str, Any]
    rows: list[ForeignRow]
    state: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_id: dict[str, Item] = {it.id: it for it in self.items}

    def group(self, name: str, key: Callable[[Item], Hashable | None]) -> dict[Hashable, list[Item]]:
        """Items grouped by `key` (None keys left out), built once per file under `name`."""
        cache = self.state.setdefault("groups", {})
        if name not in cache:
            groups: dict[Hashable, list[Item]] = {}
            for it in self.items:
                k = key(it)
                if k is not None:
                    groups.setdefault(k, []).append(it)
            cache[name] = groups
        return cache[name]


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
    # The scoring rules `--option rule=` picks from, the project's own ("mllm") first and the default.
    # "official" where a public scorer can be reproduced offline; `no_official` says why it cannot.
    rules: tuple[str, ...] = (DEFAULT_RULE,)
    no_official: str = ""
    # match(row, ctx) -> the item ids a row of another tool's predictions file answers (usually one);
    # None: the row's own id is the benchmark's id (`default_match`).
    match: Callable[[ForeignRow, MatchContext], list[str]] | None = None


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
        raise BenchmarkError(f"{len(unknown)} response id(s) not in benchmark {name!r}: {show_ids(unknown)}")
    return [(it, str(responses.get(it.id, "")), it.id not in responses) for it in items]


def show_ids(ids: list[str], k: int = 10) -> str:
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


def report_paths(out_json: str | Path) -> tuple[Path, Path]:
    """The two files `write_report(out_json, ...)` writes: FILE.json and FILE.jsonl."""
    out = Path(out_json)
    json_path = out if out.suffix == ".json" else out.with_name(out.name + ".json")
    return json_path, json_path.with_suffix(".jsonl")


def refuse_to_overwrite_inputs(out_json: str | Path, inputs: Iterable[str | Path]) -> None:
    """Raise before anything is scored when a report file would replace an input: `--predictions p.jsonl
    --out p.json` writes its records to p.jsonl, and `--out` inside the benchmark's own folder can land on
    its data. Why here and not after scoring: the input would be gone by then."""
    outs = {p.resolve(): p for p in report_paths(out_json)}
    for given in inputs:
        root = Path(given).resolve()
        for out, spelled in outs.items():
            if out == root or (root.is_dir() and out.is_file() and out.is_relative_to(root)):
                raise ValueError(
                    f"--out {out_json} would write {spelled}, which is "
                    + ("an input" if out == root else f"a file of the input folder {given}")
                    + "; choose an --out outside the inputs"
                )


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
    json_path, jsonl_path = report_paths(out_json)
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
        raise OptionError(f"benchmark {name!r} has no option(s) {stray}; its options are {sorted(known)}")


def resolve_rule(bench: Benchmark, options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The scoring rule `options` pick for `bench` (its default when none), and the options to hand to
    its `load`/`score`: `rule` stays in them only for a benchmark that has more than one rule.

    A rule the benchmark lacks is an `OptionError` that lists the rules it has (and, for "official",
    why there is none: a scorer that asks GPT-4 has no offline equivalent)."""
    opts = dict(options)
    rule = opts.get("rule", bench.rules[0])
    if rule not in bench.rules:
        why = f" ({bench.no_official})" if rule == "official" and bench.no_official else ""
        raise OptionError(
            f"benchmark {bench.name!r} has no rule {rule!r}{why}; its rules: {', '.join(bench.rules)}"
        )
    if "rule" not in bench.options:
        opts.pop("rule", None)
    return str(rule), opts


def default_match(row: ForeignRow, ctx: MatchContext) -> list[str]:
    """A foreign row's item id when the benchmark has no `match` of its own: the row's own id field
    (lmms-eval: the doc's field named like the benchmark's id)."""
    if row.layout == "lmms-eval":
        value = row.fields.get(ctx.bench.id_key)
        if value is None:
            raise BenchmarkError(
                f"{row.where}: the lmms-eval sample's doc has no {ctx.bench.id_key!r} field to match "
                f"benchmark {ctx.bench.name!r} by"
            )
        return [str(value)]
    if row.key is None or row.layout == "vlmevalkit":
        raise BenchmarkError(
            f"{row.where}: {row.layout} rows cannot be matched to benchmark {ctx.bench.name!r}'s questions"
        )
    return [row.key]


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
