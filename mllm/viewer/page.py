"""`build_view`: results -> cards -> one self-contained `index.html` (+ `thumbs/`).

A card is what the reader judges at once: one item, or the two items of an MMVP pair (scored together,
shown side by side). With two or more results a card knows, per result, whether it was answered right;
cards where the results disagree come first (A right and B wrong, then A wrong and B right), since
those are the items a comparison of two checkpoints is about.

The page's data is embedded in the HTML as JSON and drawn by a small script a page of cards at a time,
so a 3,000-item POPE run opens at once: the browser builds 50 cards, not 3,000, and filters run over
plain arrays. The CSS and script are inlined from `static/`, so the file needs nothing but its
`thumbs/` folder.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from mllm.evaluation.report import HEADLINES
from mllm.viewer.results import EvalResult, ItemInfo, load_items, load_result, unique_labels
from mllm.viewer.thumbs import Thumbnails
from mllm.viewer.views import BenchmarkView, fmt, view_for

PAGE_SIZE = 50


def parse_data_overrides(pairs: Sequence[str]) -> dict[str, Path]:
    """`--data DIR` (every result) or `--data BENCH=DIR` (the results of one benchmark)."""
    out: dict[str, Path] = {}
    for p in pairs:
        bench, sep, folder = p.partition("=")
        if sep and bench and "/" not in bench and not Path(p).exists():
            out[bench] = Path(folder)
        else:
            out["*"] = Path(p)
    return out


def _items(results: list[EvalResult], data: Path | None) -> dict[str, ItemInfo]:
    """Items of every distinct (data folder, options) the results were evaluated on, merged by id."""
    items: dict[str, ItemInfo] = {}
    seen: set[str] = set()
    for r in results:
        key = json.dumps(
            [str(data or r.meta.get("data")), r.meta.get("options")], sort_keys=True, default=str
        )
        if key not in seen:
            seen.add(key)
            for k, v in load_items(r, data).items():
                items.setdefault(k, v)
    return items


def _answer(view: BenchmarkView, rec: dict[str, Any] | None) -> dict[str, Any] | None:
    if rec is None:
        return None
    out: dict[str, Any] = {
        "response": str(rec.get("response", "")),
        "extracted": "unparsed" if rec.get("extracted") is None else view.extracted(rec),
        "ok": bool(rec.get("correct")),
        "missing": bool(rec.get("missing")),
    }
    if view.boxes:
        box = rec.get("extracted")
        out["box"] = box if isinstance(box, list) and len(box) == 4 else None
        out["iou"] = fmt(rec.get("iou"))
    return out


def _rank(ok: list[bool | None]) -> int:
    """0: the first result right and another wrong; 1: the first wrong and another right; 2: agreement."""
    known = [v for v in ok if v is not None]
    if len(known) < 2 or len(set(known)) == 1 or ok[0] is None:
        return 2
    return 0 if ok[0] else 1


def build_group(
    bench: str, results: list[EvalResult], thumbs: Thumbnails, data: Path | None
) -> dict[str, Any]:
    """One benchmark's section: its results, panels, facets and cards."""
    view = view_for(bench)
    for k, r in enumerate(results):
        r.tag = chr(ord("A") + k) if k < 26 else f"R{k + 1}"
    ctx = view.context(results[0], data)
    items = _items(results, data)
    ids = list(dict.fromkeys(i for r in results for i in r.by_id))
    cards: dict[str, dict[str, Any]] = {}
    for ident in ids:
        recs = [r.by_id.get(ident) for r in results]
        base = next(rec for rec in recs if rec is not None)
        info = items.get(ident)
        item: dict[str, Any] = {
            "id": ident,
            "thumb": thumbs.get(info.image) if info is not None else None,
            "thumb_size": thumbs.size(info.image) if info is not None else None,
            "prompt": str(base.get("prompt", "")),
            "gold": view.gold(base),
            "facets": view.facets(base, info, ctx),
            "r": [_answer(view, rec) for rec in recs],
        }
        if view.boxes and base.get("bbox") is not None:
            item["size"] = [base.get("width"), base.get("height")]
            item["gold_box"] = base.get("bbox")
        key = view.pair(base)
        card = cards.setdefault(
            f"pair:{key}" if key is not None else f"item:{ident}", {"items": [], "pair": key}
        )
        card["items"].append(item)
    out_cards = []
    for card in cards.values():
        ok: list[bool | None] = []
        for k in range(len(results)):
            answers = [it["r"][k] for it in card["items"]]
            ok.append(None if any(a is None for a in answers) else all(a["ok"] for a in answers))
        facets: dict[str, str] = {}
        for it in card["items"]:
            facets.update(it["facets"])
        out_cards.append({**card, "ok": ok, "facets": facets, "rank": _rank(ok)})
    if len(results) > 1:
        out_cards.sort(key=lambda c: c["rank"])  # stable: benchmark order within each group
    facet_values: dict[str, list[str]] = {}
    for c in out_cards:
        for k, v in c["facets"].items():
            facet_values.setdefault(k, [])
            if v not in facet_values[k]:
                facet_values[k].append(v)
    headline = HEADLINES.get(bench)
    return {
        "benchmark": bench,
        "results": [
            {
                "label": r.label,
                "tag": r.tag,
                "path": str(r.path),
                "rule": r.meta.get("rule", "mllm"),
                "source": str(r.meta.get("model") or r.meta.get("predictions") or ""),
                "headline": [headline[0], fmt(headline[1](r.metrics))] if headline else None,
                "n": len(r.records),
            }
            for r in results
        ],
        "panels": view.panels(results, ctx),
        "facets": {k: sorted(v) for k, v in facet_values.items()},
        "pairs": any(c["pair"] is not None for c in out_cards),
        "boxes": view.boxes,
        "cards": out_cards,
        "items": sum(len(c["items"]) for c in out_cards),
        "images": sum(1 for c in out_cards for it in c["items"] if it["thumb"]),
    }


def _asset(name: str) -> str:
    return resources.files("mllm.viewer").joinpath(f"static/{name}").read_text(encoding="utf-8")


def render_html(data: dict[str, Any]) -> str:
    """The page: template + inlined CSS and script + the data as JSON (`</` escaped for the script tag)."""
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    template = _asset("viewer.html").replace("{{TITLE}}", _escape(str(data["title"])), 1)
    # Cut the template itself at its markers (CSS, data, script, in that order), so no inserted text is
    # ever searched for a marker.
    head, _, rest = template.partition("/*CSS*/")
    middle, _, rest = rest.partition("/*DATA*/")
    before_js, _, tail = rest.partition("/*JS*/")
    return head + _asset("viewer.css") + middle + blob + before_js + _asset("viewer.js") + tail


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def default_title(by_bench: dict[str, list[EvalResult]]) -> str:
    """One benchmark: its name and its results (A vs B); several: their names."""
    if len(by_bench) == 1:
        (bench, rs), *_ = by_bench.items()
        return f"{bench}: " + " vs ".join(r.label for r in rs[:4]) + (" ..." if len(rs) > 4 else "")
    return "mllm eval results: " + ", ".join(by_bench)


def build_view(
    results: Sequence[str | Path],
    out: str | Path,
    data: Sequence[str] = (),
    title: str | None = None,
    page_size: int = PAGE_SIZE,
) -> Path:
    """Write `out/index.html` (and `out/thumbs/`) over `results` (`mllm eval` metrics JSON files);
    returns the HTML's path. Results of different benchmarks become sections of one report."""
    if not results:
        raise ValueError("mllm view: give at least one result (an `mllm eval` FILE.json)")
    loaded = [load_result(p) for p in results]
    overrides = parse_data_overrides(data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    thumbs = Thumbnails(out)
    by_bench: dict[str, list[EvalResult]] = {}
    for r in loaded:
        by_bench.setdefault(r.benchmark, []).append(r)
    for rs in by_bench.values():
        unique_labels(rs)  # within a section: one model evaluated on two benchmarks keeps its name
    groups = [build_group(b, rs, thumbs, overrides.get(b, overrides.get("*"))) for b, rs in by_bench.items()]
    page = {
        "title": title or default_title(by_bench),
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "page_size": page_size,
        "groups": groups,
    }
    path = out / "index.html"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render_html(page), encoding="utf-8")
    tmp.replace(path)
    return path
