"""What the report shows of each benchmark: a registry of views, one entry per benchmark.

A view says, from a benchmark's records, what the gold answer is, which facets the items are filtered
by (POPE's split, QA's category, MMVP's pattern, MathVerse's version), whether items pair up (MMVP's
two images of one question are shown side by side and scored together), whether a record has boxes to
draw (RefCOCO), and the summary panels above the items (POPE's confusion matrix and yes-ratio per split,
MathVerse's accuracy by version, ...). A benchmark without an entry gets the generic view: its records'
own fields and its scalar metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encoders.registry import Registry
from mllm.viewer.results import EvalResult, ItemInfo, side_file

Panel = dict[str, Any]  # {"type": "table", "title", "columns", "rows"} | {"type": "matrix", ...}


def fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Panel:
    return {"type": "table", "title": title, "columns": columns, "rows": [[fmt(c) for c in r] for r in rows]}


def scalar_metrics(results: list[EvalResult], title: str = "metrics") -> Panel:
    """Every top-level number of the results' metrics, one column per result."""
    keys = list(
        dict.fromkeys(k for r in results for k, v in r.metrics.items() if isinstance(v, (int, float)))
    )
    return table(
        title,
        ["metric", *[r.tag for r in results]],
        [[k, *[r.metrics.get(k) for r in results]] for k in keys],
    )


@dataclass(frozen=True)
class BenchmarkView:
    name: str
    gold: Callable[[dict[str, Any]], str] = lambda rec: fmt(rec.get("answer", rec.get("label")))
    extracted: Callable[[dict[str, Any]], str] = lambda rec: fmt(rec.get("extracted"))  # not None
    # (record, the loaded item or None, context) -> {facet: value}
    facets: Callable[[dict[str, Any], ItemInfo | None, dict[str, Any]], dict[str, str]] = (
        lambda rec, it, ctx: {}
    )
    panels: Callable[[list[EvalResult], dict[str, Any]], list[Panel]] = lambda results, ctx: [
        scalar_metrics(results)
    ]
    pair: Callable[[dict[str, Any]], str | None] = lambda rec: None  # items with one key are one card
    boxes: bool = (
        False  # records carry `bbox` (gold) and `extracted` (predicted) pixel boxes, `width`, `height`
    )
    # (first result, --data folder or None) -> whatever `facets` and `panels` need beyond the records
    context: Callable[[EvalResult, Path | None], dict[str, Any]] = lambda result, data: {}


VIEWS: Registry[BenchmarkView] = Registry("benchmark view")


def register_view(view: BenchmarkView) -> BenchmarkView:
    return VIEWS.register(view.name, view, stacklevel=2)


def view_for(benchmark: str) -> BenchmarkView:
    return VIEWS[benchmark] if benchmark in VIEWS else BenchmarkView(benchmark)


# ---------------------------------------------------------------------------------------------- POPE
POPE_SPLITS = ("random", "popular", "adversarial")


def pope_panels(results: list[EvalResult], ctx: dict[str, Any]) -> list[Panel]:
    """Mean F1 and yes-ratio per split, then per split one confusion matrix a result: gold yes/no
    against said yes/no/unparsed, with yes-ratio, accuracy and F1 under it."""
    splits = [s for s in POPE_SPLITS if any(s in r.metrics for r in results)]
    splits += sorted({str(rec.get("split")) for r in results for rec in r.records} - set(splits) - {"None"})
    tags = [r.tag for r in results]
    panels = [
        table(
            "POPE",
            ["", *tags],
            [["mean F1", *[r.metrics.get("mean_f1") for r in results]]]
            + [
                [f"yes-ratio {s} (%)", *[r.metrics.get(s, {}).get("yes_ratio") for r in results]]
                for s in splits
            ],
        )
    ]
    for split in splits:
        blocks = []
        for r in results:
            recs = [rec for rec in r.records if rec.get("split") == split]
            if not recs:
                continue
            m = r.metrics.get(split, {})
            cells = [
                [
                    sum(rec.get("label") == gold and rec.get("extracted") == said for rec in recs)
                    for said in ("yes", "no", None)
                ]
                for gold in ("yes", "no")
            ]
            note = (
                f"yes-ratio {fmt(m.get('yes_ratio'))}% · acc {fmt(m.get('accuracy'))} · F1 {fmt(m.get('f1'))}"
            )
            blocks.append({"label": r.tag, "cells": cells, "note": note})
        panels.append(
            {
                "type": "matrix",
                "title": f"{split}: confusion matrix",
                "rows": ["gold yes", "gold no"],
                "cols": ["said yes", "said no", "unparsed"],
                "blocks": blocks,
            }
        )
    return panels


register_view(
    BenchmarkView(
        "pope",
        gold=lambda rec: fmt(rec.get("label")),
        facets=lambda rec, it, ctx: {"split": str(rec.get("split"))},
        panels=pope_panels,
    )
)


# ---------------------------------------------------------------------------------------------- MMVP
def _option(rec: dict[str, Any], letter: Any) -> str:
    opts = rec.get("options") or {}
    key = str(letter).strip("()") if letter is not None else None
    return f"({key}) {opts[key]}" if key in opts else fmt(letter)


def mmvp_context(result: EvalResult, data: Path | None) -> dict[str, Any]:
    """GeoWorld writes `patterns.json` ({Index: pattern}) beside MMVP's files; the real MMVP has none."""
    return {"patterns": side_file(result, "patterns.json", data) or {}}


def mmvp_panels(results: list[EvalResult], ctx: dict[str, Any]) -> list[Panel]:
    panels = [
        table(
            "MMVP",
            ["metric", *[r.tag for r in results]],
            [
                [k, *[r.metrics.get(k) for r in results]]
                for k in ("pair_accuracy", "question_accuracy", "pairs", "unparsed")
            ],
        )
    ]
    patterns: dict[str, str] = ctx.get("patterns") or {}
    if patterns:
        names = sorted(set(patterns.values()))
        rows = []
        for name in names:
            row: list[Any] = [name]
            for r in results:
                pairs: dict[Any, list[bool]] = {}
                for rec in r.records:
                    if patterns.get(str(rec.get("id"))) == name:
                        pairs.setdefault(rec.get("pair"), []).append(bool(rec.get("correct")))
                full = [all(v) for v in pairs.values() if len(v) == 2]
                row.append(100.0 * sum(full) / len(full) if full else None)
            rows.append(row)
        panels.append(table("pair accuracy by pattern (%)", ["pattern", *[r.tag for r in results]], rows))
    return panels


register_view(
    BenchmarkView(
        "mmvp",
        gold=lambda rec: _option(rec, rec.get("answer")),
        extracted=lambda rec: _option(rec, rec.get("extracted")),
        facets=lambda rec, it, ctx: (
            {"pattern": ctx["patterns"][str(rec.get("id"))]}
            if str(rec.get("id")) in ctx.get("patterns", {})
            else {}
        ),
        panels=mmvp_panels,
        pair=lambda rec: None if rec.get("pair") is None else str(rec["pair"]),
        context=mmvp_context,
    )
)


# ---------------------------------------------------------------------------------------------- MathVerse
def mathverse_panels(results: list[EvalResult], ctx: dict[str, Any]) -> list[Panel]:
    versions = list(dict.fromkeys(v for r in results for v in (r.metrics.get("versions") or {})))
    rows = [[v, *[(r.metrics.get("versions") or {}).get(v) for r in results]] for v in versions]
    rows.append(["all (mean of the five)", *[r.metrics.get("all") for r in results]])
    rows.append(["Text Only", *[r.metrics.get("text_only") for r in results]])
    rows.append(["unparsed", *[r.metrics.get("unparsed") for r in results]])
    return [table("accuracy by problem version (%)", ["version", *[r.tag for r in results]], rows)]


register_view(
    BenchmarkView(
        "mathverse",
        facets=lambda rec, it, ctx: {
            "version": str(rec.get("version")),
            "question type": str(rec.get("question_type")),
        },
        panels=mathverse_panels,
    )
)


# ---------------------------------------------------------------------------------------------- RefCOCO
def _box(box: Any) -> str:
    if not isinstance(box, list):
        return fmt(box)
    return "[" + ", ".join(f"{float(v):.1f}".rstrip("0").rstrip(".") for v in box) + "]"


def refcoco_panels(results: list[EvalResult], ctx: dict[str, Any]) -> list[Panel]:
    keys = ["acc@0.5", "acc@0.25", "acc@0.75", "miou", "unparsed"]
    return [
        table(
            "grounding",
            ["metric", *[r.tag for r in results]],
            [[k, *[r.metrics.get(k) for r in results]] for k in keys],
        )
    ]


register_view(
    BenchmarkView(
        "refcoco",
        gold=lambda rec: _box(rec.get("bbox")),
        extracted=lambda rec: _box(rec.get("extracted")),
        panels=refcoco_panels,
        boxes=True,
    )
)


# ---------------------------------------------------------------------------------------------- GeoWorld QA
def qa_panels(results: list[EvalResult], ctx: dict[str, Any]) -> list[Panel]:
    cats = list(dict.fromkeys(c for r in results for c in (r.metrics.get("per_category") or {})))
    rows = [[c, *[(r.metrics.get("per_category") or {}).get(c) for r in results]] for c in cats]
    rows.append(["all", *[r.metrics.get("accuracy") for r in results]])
    return [table("accuracy by category (%)", ["category", *[r.tag for r in results]], rows)]


register_view(
    BenchmarkView(
        "qa",
        facets=lambda rec, it, ctx: {"category": str(rec.get("category"))},
        panels=qa_panels,
    )
)
