"""`mllm report`: one markdown table across checkpoints and benchmarks, beside published numbers.

Each `mllm eval` metrics file carries a `meta` block (benchmark, model, decoding, scoring rule); the
report takes each benchmark's headline metric from it. The reference rows are the numbers collected
in the project's benchmark notes (`shared/reference/benchmarks.md`), shown for context only: they were
measured on the real benchmarks, ours on whatever data folder the metrics came from.

The scoring rule is shown with every number: a result scored by the public scorer (`rule=official`)
is its own row, marked "[rule: official]", and the note under the table says which rule each
benchmark's column used, so a number is never read against a published one computed another way.
Files written before rules were recorded were scored by the project's rule, "mllm".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# benchmark -> (column title, how to read the headline number from its metrics)
HEADLINES: dict[str, tuple[str, Any]] = {
    "mmvp": ("MMVP pair acc", lambda m: m.get("pair_accuracy")),
    "mmvp_vlm": ("MMVP-VLM avg", lambda m: m.get("average")),
    "retrieval": ("Retrieval mean R@1", lambda m: m.get("mean_R@1")),
    "mathverse": ("MathVerse all", lambda m: m.get("all")),
    "pope": ("POPE mean F1", lambda m: m.get("mean_f1")),
    "refcoco": ("RefCOCO acc@0.5", lambda m: m.get("acc@0.5")),
    "qa": ("GeoWorld QA acc", lambda m: m.get("accuracy")),
}

# Published numbers (shared/reference/benchmarks.md), by benchmark then system.
REFERENCE: dict[str, dict[str, float]] = {
    "mmvp": {"LLaVA-1.5-13B": 24.7, "LLaVA-1.5-13B + Interleaved-MoF": 28.0, "GPT-4V": 38.7, "humans": 95.7},
    "mmvp_vlm": {
        "CLIP ViT-L/14 224px": 19.3,
        "CLIP ViT-L/14 336px": 20.0,
        "MetaCLIP-L": 23.7,
        "MetaCLIP-H": 25.2,
    },
    "mathverse": {"LLaVA-1.5-13B": 7.6, "GPT-4V": 39.4, "humans": 64.9, "SVE-Math-Qwen2.5-7B": 31.4},
    "pope": {"LLaVA-1.5-7B": 85.9, "LLaVA-1.5-13B": 85.9},
    "refcoco": {"LLaVA-1.5-7B (RefCOCO val)": 56.2},
}


def load_results(paths: list[str | Path]) -> list[dict[str, Any]]:
    rows = []
    for p in paths:
        p = Path(p)
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: not a readable metrics JSON ({e})") from e
        meta = data.get("meta") or {}
        bench = meta.get("benchmark")
        if bench not in HEADLINES:
            raise ValueError(
                f"{p}: no meta.benchmark among {sorted(HEADLINES)} (was it written by `mllm eval`?)"
            )
        label = meta.get("model") or p.stem
        rule = str(meta.get("rule", "mllm"))
        if meta.get("decoding", "greedy") != "greedy":
            params = meta.get("agla") or {}
            detail = ", ".join(f"{k}={v}" for k, v in params.items())
            label += f" [{meta['decoding']}{': ' + detail if detail else ''}]"
        if rule != "mllm":
            label += f" [rule: {rule}]"
        if any(r["label"] == label and r["benchmark"] == bench for r in rows):
            label += f" ({p.name})"  # two results of one setting: keep both, told apart by file
        rows.append(
            {
                "label": label,
                "benchmark": bench,
                "value": HEADLINES[bench][1](data),
                "file": str(p),
                "rule": rule,
            }
        )
    return rows


def render(rows: list[dict[str, Any]], references: bool = True) -> str:
    benches = [b for b in HEADLINES if any(r["benchmark"] == b for r in rows)]
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cell = {(r["label"], r["benchmark"]): r["value"] for r in rows}
    head = "| model | " + " | ".join(HEADLINES[b][0] for b in benches) + " |"
    lines = [head, "|" + "---|" * (len(benches) + 1)]
    for label in labels:
        vals = [cell.get((label, b)) for b in benches]
        lines.append(f"| {label} | " + " | ".join("—" if v is None else f"{v:.1f}" for v in vals) + " |")
    if references:
        systems = list(dict.fromkeys(s for b in benches for s in REFERENCE.get(b, {})))
        for s in systems:
            vals = [REFERENCE.get(b, {}).get(s) for b in benches]
            lines.append(
                f"| *{s} (published)* | " + " | ".join("" if v is None else f"{v:.1f}" for v in vals) + " |"
            )
    rules = {b: sorted({r.get("rule", "mllm") for r in rows if r["benchmark"] == b}) for b in benches}
    note = (
        "\nScoring rules: "
        + "; ".join(f"{HEADLINES[b][0]}: {', '.join(rules[b])}" for b in benches)
        + (
            " (mllm = the project's rules, official = the public scorer; docs/evaluation.md lists the differences)."
        )
    )
    if references:
        note += (
            "\nPublished rows are the real benchmarks' numbers (shared/reference/benchmarks.md), for context: "
            "they are not comparable with scores on GeoWorld's synthetic sets."
        )
    return "\n".join(lines) + "\n" + note + "\n"
