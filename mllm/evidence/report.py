"""A claim's table (JSON + markdown) and figure (each arm's mean with its 95% interval, seeds as dots) at
one budget, from the arms' per-item units."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from mllm.evidence.claims import CLAIMS, Claim, Measure
from mllm.evidence.stats import (
    Table,
    bootstrap_mean,
    metric_value,
    paired_bootstrap,
    table_from_rows,
    verdict,
)
from mllm.logging_backends import cpu_flags, cpu_name
from mllm.training.checkpoint import atomic_write_text

Units = dict[str, dict[int, dict[str, list[dict[str, Any]]]]]  # arm -> seed -> bench -> rows

#: the columns each metric reads
COLUMNS = {
    "accuracy": ("correct",),
    "f1": ("tp", "fp", "fn"),
    "yes_ratio": ("yes",),
    "R@1": ("r1",),
    "R@5": ("r5",),
}


def measure_table(rows: list[dict[str, Any]], m: Measure) -> Table:
    sel = [r for r in rows if m.group is None or r["group"] == m.group]
    if not sel:
        groups = sorted({r["group"] for r in rows})
        raise ValueError(f"{m.name}: no units in group {m.group!r} (groups: {groups})")
    return table_from_rows(sel, COLUMNS[m.metric])


def _machine() -> str:
    return f"{cpu_name()} ({', '.join(cpu_flags()) or 'no avx2/avx512'}), {os.cpu_count()} cores"


def command_line(claim: Claim, level: int, seeds: list[int], out: Path, bases: Path, quick: bool) -> str:
    """The command that trains these arms again: `--arms` named where the table holds only some of the
    registered claim's arms (a cap run on the comparisons still open), else a rerun would train them all."""
    names = [a.name for a in claim.arms]
    registered = CLAIMS.get(claim.name)
    subset = registered is not None and names != [a.name for a in registered.arms]
    return (
        f"mllm evidence {claim.name} --seeds {' '.join(map(str, seeds))} --budget {level} "
        + (f"--arms {' '.join(names)} " if subset else "")
        + f"--out {out.parent} --bases {bases}"
        + (" --quick" if quick else "")
    )


def write_report(
    claim: Claim,
    level: int,
    seeds: list[int],
    units: Units,
    costs: dict[str, dict[int, dict[str, Any]]],
    metrics: dict[str, dict[int, dict[str, dict[str, Any]]]],
    out: Path,
    bases: Path,
    quick: bool,
) -> dict[str, Any]:
    arms = [a.name for a in claim.arms]
    per_arm: dict[str, dict[str, Any]] = {}
    tables = {
        m.name: {a: [measure_table(units[a][s][m.bench], m) for s in seeds] for a in arms}
        for m in claim.measures
    }
    for m in claim.measures:
        for a in arms:
            ci = bootstrap_mean(tables[m.name][a], m.metric)
            per_arm.setdefault(m.name, {})[a] = {
                "mean": ci.diff,
                "low": ci.low,
                "high": ci.high,
                "per_seed": [metric_value(t, m.metric) for t in tables[m.name][a]],
                "items_per_seed": [len(t.ids) for t in tables[m.name][a]],
            }
    comparisons = []
    for c in claim.comparisons:
        iv = paired_bootstrap(
            tables[c.measure.name][c.reference], tables[c.measure.name][c.arm], c.measure.metric
        )
        comparisons.append(
            {
                "comparison": c.key,
                "arm": c.arm,
                "reference": c.reference,
                "measure": c.measure.name,
                "expect": c.expect,
                **iv.as_dict(),
                "verdict": verdict(iv, c.expect),
            }
        )
    cost = {
        a: {
            "train_cpu_s": [costs[a][s]["cpu_s"] for s in seeds],
            "train_wall_s": [costs[a][s]["wall_s"] for s in seeds],
            "steps": costs[a][seeds[0]]["stages"]
            and {k: v["steps"] for k, v in costs[a][seeds[0]]["stages"].items()},
            "shared_with_base": costs[a][seeds[0]]["shared_with_base"],
            # the budget folder whose run an arm reused (a budget that only adds held-out items), per seed
            "trained_at": [_budget_folder(costs[a][s].get("trained_at")) for s in seeds],
        }
        for a in arms
    }
    result = {
        "groups": _groups(claim, seeds, units),
        "scalars": _scalars(claim, seeds, metrics),
        "claim": claim.name,
        "title": claim.title,
        "paper": claim.paper,
        "budget": level,
        "budget_describe": claim.budgets[level].describe,
        "seeds": seeds,
        "arms": {a.name: a.describe for a in claim.arms},
        "cost": cost,
        "measures": per_arm,
        "comparisons": comparisons,
        "command": command_line(claim, level, seeds, out, bases, quick),
        "machine": _machine(),
        "bootstrap": "95% percentile interval, 2,000 draws of seeds (with replacement) and, within each, items "
        "(with replacement, the same items for both arms)",
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table.json", json.dumps(result, indent=1))
    atomic_write_text(out / "table.md", markdown(claim, result))
    figure(claim, result, out / "figure.png")
    return result


def _budget_folder(trained_at: str | None) -> str | None:
    """`OUT/b<K>/<arm>/s<seed>` -> "b<K>" (None: trained at this budget)."""
    return Path(trained_at).parents[1].name if trained_at else None


#: the figure a benchmark's per-group breakdown shows (the rest: accuracy)
PRIMARY = {"retrieval": "R@1"}
#: per-run numbers that are not per-item (the embedding geometry), reported as means over seeds
SCALARS = ("modality_gap", "alignment", "uniformity_image", "uniformity_text")


def _groups(claim: Claim, seeds: list[int], units: Units) -> dict[str, dict[str, dict[str, float]]]:
    """bench -> group -> arm -> the primary metric's mean over seeds, for benchmarks with several groups
    (MMVP's patterns, QA's categories, POPE's splits): the detail behind the compared measures."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    first = claim.arms[0].name
    for bench in claim.benches:
        groups = sorted({r["group"] for r in units[first][seeds[0]][bench]})
        if len(groups) < 2:
            continue
        metric = PRIMARY.get(bench, "accuracy")
        out[bench] = {
            g: {
                a.name: float(
                    np.mean(
                        [
                            metric_value(
                                measure_table(units[a.name][s][bench], Measure(bench, metric, g)), metric
                            )
                            for s in seeds
                        ]
                    )
                )
                for a in claim.arms
            }
            for g in groups
        }
    return out


def _scalars(
    claim: Claim, seeds: list[int], metrics: dict[str, dict[int, dict[str, dict[str, Any]]]]
) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    for a in claim.arms:
        for s in seeds:
            for m in metrics[a.name][s].values():
                for key in SCALARS:
                    if key in m:
                        out.setdefault(key, {}).setdefault(a.name, []).append(float(m[key]))
    return out


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def markdown(claim: Claim, r: dict[str, Any]) -> str:
    arms = list(r["arms"])
    lines = [
        f"## {r['title']}",
        "",
        f"Paper: {r['paper']}",
        "",
        f"Budget {r['budget']}: {r['budget_describe']}. Seeds {', '.join(map(str, r['seeds']))}. "
        f"Machine: {r['machine']}.",
        "",
        f"Command: `{r['command']}`",
        "",
        "| arm | what | train CPU-s per seed | stages trained (steps) | shared with the base |",
        "|---|---|---|---|---|",
    ]
    for a in arms:
        c = r["cost"][a]
        steps = ", ".join(f"{k} {v}" for k, v in (c["steps"] or {}).items()) or "none"
        reused = sorted({b for b in c.get("trained_at", []) if b})
        if reused:
            steps += f" (trained at {', '.join(reused)}, reused)"
        lines.append(
            f"| {a} | {r['arms'][a]} | {' / '.join(_fmt(x) for x in c['train_cpu_s'])} | {steps} | "
            f"{', '.join(c['shared_with_base']) or '-'} |"
        )
    lines += ["", "| measure | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for name, per in r["measures"].items():
        cells = [
            f"{_fmt(per[a]['mean'])} [{_fmt(per[a]['low'])}, {_fmt(per[a]['high'])}] "
            f"({' / '.join(_fmt(x) for x in per[a]['per_seed'])})"
            for a in arms
        ]
        n = per[arms[0]]["items_per_seed"]
        lines.append(f"| {name} (n {'/'.join(map(str, n))}) | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Mean over seeds [95% interval] (per seed); n: items per seed.",
        "",
        "| comparison | claimed | difference [95% interval] | verdict |",
        "|---|---|---|---|",
    ]
    for c in r["comparisons"]:
        claimed = {1: "higher", -1: "lower", 0: "-"}[c["expect"]]
        lines.append(
            f"| {c['comparison']} | {claimed} | {c['diff']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}] | "
            f"{c['verdict']} |"
        )
    for bench, groups in r.get("groups", {}).items():
        metric = PRIMARY.get(bench, "accuracy")
        lines += [
            "",
            f"{bench} by group ({metric}, mean over seeds):",
            "",
            "| group | " + " | ".join(arms) + " |",
        ]
        lines.append("|---|" + "---|" * len(arms))
        lines += [f"| {g} | " + " | ".join(_fmt(v[a]) for a in arms) + " |" for g, v in groups.items()]
    if r.get("scalars"):
        lines += ["", "Embedding geometry on the held-out captions (mean over seeds):", ""]
        lines += ["| arm | " + " | ".join(r["scalars"]) + " |", "|---|" + "---|" * len(r["scalars"])]
        for a in arms:
            cells = [f"{np.mean(v[a]):.3f}" if a in v else "-" for v in r["scalars"].values()]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += ["", f"Bootstrap: {r['bootstrap']}."]
    lines += [f"Note: {n}" for n in claim.notes]
    return "\n".join(lines) + "\n"


def figure(claim: Claim, r: dict[str, Any], path: Path) -> Path:
    names = list(r["measures"])
    arms = list(r["arms"])
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), dpi=110)
    rng = np.random.default_rng(0)
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        per = r["measures"][name]
        for i, a in enumerate(arms):
            p = per[a]
            ax.errorbar(
                [i],
                [p["mean"]],
                yerr=[[p["mean"] - p["low"]], [p["high"] - p["mean"]]],
                fmt="o",
                color="C0",
                capsize=4,
                markersize=6,
            )
            ax.scatter(
                i + rng.uniform(-0.12, 0.12, len(p["per_seed"])) + 0.25,
                p["per_seed"],
                s=12,
                color="C1",
                zorder=3,
            )
        ax.set_xticks(range(len(arms)), arms, fontsize=8)
        ax.set_xlim(-0.5, len(arms) - 0.3)
        ax.set_title(name, fontsize=9)
        if k % cols == 0:
            ax.set_ylabel("percent", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"{claim.name}, budget {r['budget']}: mean and 95% interval (blue), seeds (orange)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path)
    return path


def summarize(root: Path) -> str:
    """One markdown table of every claim's comparisons under `root`, each at the largest budget it was
    run at (a larger budget may rerun only some comparisons), for the overview in docs/evidence.md. The
    two arms' means stand beside the difference because an unresolved verdict reads differently at a
    measure's floor or ceiling (nothing to move) than in its middle (a real tie, or too few items)."""
    lines = [
        "| claim | comparison | budget | arm / reference (means) | difference [95% interval] | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for summary_path in sorted(root.glob("*/summary.json")):
        latest: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        for path in sorted(summary_path.parent.glob("b*/table.json"), key=lambda p: int(p.parent.name[1:])):
            r = json.loads(path.read_text())
            for c in r["comparisons"]:
                latest[c["comparison"]] = (r, c)
        for r, c in latest.values():
            means = r["measures"][c["measure"]]
            lines.append(
                f"| {r['claim']} | {c['comparison']} | {r['budget']} ({len(r['seeds'])} seeds) | "
                f"{means[c['arm']]['mean']:.1f} / {means[c['reference']]['mean']:.1f} | "
                f"{c['diff']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}] | {c['verdict']} |"
            )
    return "\n".join(lines) + "\n"
