"""`mllm plot RUN_DIR`: a run's learning curves as one PNG.

Four panels from what training already writes, `RUN/<stage>/metrics.jsonl` (loss, learning rate per
parameter group, step_s) and `RUN/<stage>/evals.jsonl` (`eval_every`): loss and learning rate against
step, accuracy (overall and per category) against step and against training seconds. Stages are laid
end to end on one global step axis (and one seconds axis, the sum of step_s, evaluation excluded) with
their boundaries marked, so a recipe reads left to right as it trained.

Reading is forgiving of a run still in progress (a torn last line is skipped); writing is atomic
(temporary file, then rename), so a killed `mllm plot` never leaves half a PNG where the last one was.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory


@dataclass
class StageCurves:
    """One stage's records, in the order written."""

    name: str
    metrics: list[dict[str, Any]]
    evals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return max(int(r["step"]) for r in self.metrics)

    @property
    def seconds(self) -> float:
        return sum(float(r.get("step_s") or 0.0) for r in self.metrics)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The step records of a JSONL file; lines that do not parse (a run killed, or still writing,
    mid-line) or carry no integer step are skipped rather than fatal."""
    if not path.is_file():
        return []
    out = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and not isinstance(rec["step"], bool):
            out.append(rec)
    return out


def _stage_order(run_dir: Path) -> list[str]:
    """Stage names in training order: the run's recipe.yaml first, then any other stage folders by name."""
    names: list[str] = []
    try:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
        names = [str(s["name"]) for s in recipe.get("stages") or [] if isinstance(s, dict) and "name" in s]
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    others = sorted(p.parent.name for p in run_dir.glob("*/metrics.jsonl") if p.parent.name not in names)
    return names + others


def load_run(run_dir: str | Path) -> list[StageCurves]:
    """Every stage of `run_dir` that has at least one metrics line (a stage folder itself works too)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    if (run_dir / "metrics.jsonl").is_file():  # one stage's folder
        dirs = [(run_dir.name, run_dir)]
    else:
        dirs = [(name, run_dir / name) for name in _stage_order(run_dir)]
    stages = []
    for name, d in dirs:
        metrics = read_jsonl(d / "metrics.jsonl")
        if metrics:
            stages.append(StageCurves(name, metrics, read_jsonl(d / "evals.jsonl")))
    if not stages:
        raise ValueError(f"{run_dir}: no metrics to plot (no <stage>/metrics.jsonl with a step line)")
    return stages


def _accuracy_series(stages: list[StageCurves]) -> dict[str, list[tuple[float, float, float]]]:
    """(global step, global seconds, accuracy) per series: "<benchmark>" overall and
    "<benchmark>/<category>", continued across stages that evaluate the same benchmark."""
    series: dict[str, list[tuple[float, float, float]]] = {}
    step0, sec0 = 0, 0.0
    for st in stages:
        for e in st.evals:
            bench = str(e.get("benchmark", "eval"))
            x, t = step0 + e["step"], sec0 + float(e.get("wall_s") or 0.0)
            if isinstance(e.get("accuracy"), (int, float)):
                series.setdefault(bench, []).append((x, t, float(e["accuracy"])))
            for cat, acc in (e.get("per_category") or {}).items():
                if isinstance(acc, (int, float)):
                    series.setdefault(f"{bench}/{cat}", []).append((x, t, float(acc)))
        step0 += st.steps
        sec0 += st.seconds
    return series


def draw(stages: list[StageCurves], title: str = "") -> Figure:
    """The four-panel figure (a matplotlib Figure; no pyplot, so no global state or GUI backend)."""
    fig = Figure(figsize=(13, 8.5), dpi=100, layout="constrained")
    ax_loss, ax_lr, ax_acc, ax_wall = fig.subplots(2, 2).ravel()
    step_bounds, sec_bounds = [], []
    step0, sec0 = 0, 0.0
    lr_lines: dict[str, list[tuple[int, float]]] = {}
    for i, st in enumerate(stages):
        pts = [(step0 + r["step"], r["loss"]) for r in st.metrics if isinstance(r.get("loss"), (int, float))]
        if pts:
            ax_loss.plot(*zip(*pts), lw=1.2, color=f"C{i % 10}")
        for r in st.metrics:
            for group, lr in (r.get("lr") or {}).items():
                if isinstance(lr, (int, float)):
                    lr_lines.setdefault(group, []).append((step0 + r["step"], lr))
        step_bounds.append((step0, st.name))
        sec_bounds.append(sec0)
        step0 += st.steps
        sec0 += st.seconds
    for j, (group, pts) in enumerate(lr_lines.items()):
        pts.sort()
        ax_lr.plot(*zip(*pts), lw=1.2, color=f"C{j % 10}", label=group)
    if any(lr > 0 for pts in lr_lines.values() for _, lr in pts):
        ax_lr.set_yscale("log")
    if lr_lines:
        ax_lr.legend(fontsize=8, title="param group", title_fontsize=8)

    series = _accuracy_series(stages)
    for k, (name, pts) in enumerate(sorted(series.items(), key=lambda kv: ("/" in kv[0], kv[0]))):
        overall = "/" not in name
        style = (
            dict(lw=2.2, color="black", marker="o", ms=4, zorder=5)
            if overall
            else dict(lw=1.0, color=f"C{k % 10}", marker=".", ms=5, alpha=0.85)
        )
        label = f"{name} (all)" if overall else name.split("/", 1)[1]
        ax_acc.plot([p[0] for p in pts], [p[2] for p in pts], label=label, **style)
        ax_wall.plot([p[1] for p in pts], [p[2] for p in pts], label=label, **style)
    if series:
        ax_acc.legend(fontsize=7, ncol=2)
    else:
        for ax in (ax_acc, ax_wall):
            ax.text(
                0.5,
                0.5,
                "no evals.jsonl\n(set eval_every in a stage)",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="grey",
            )

    for ax in (ax_loss, ax_lr, ax_acc):
        trans = blended_transform_factory(ax.transData, ax.transAxes)
        for x, name in step_bounds:
            if x > 0:
                ax.axvline(x, color="grey", ls="--", lw=0.8)
            ax.text(
                x,
                1.0,
                f" {name}",
                transform=trans,
                fontsize=7,
                color="grey",
                va="bottom",
                ha="left",
                clip_on=False,
            )
    for x in sec_bounds[1:]:
        ax_wall.axvline(x, color="grey", ls="--", lw=0.8)
    ax_loss.set(xlabel="optimiser step (stages end to end)", ylabel="training loss")
    ax_lr.set(xlabel="optimiser step", ylabel="learning rate")
    ax_acc.set(xlabel="optimiser step", ylabel="held-out accuracy (%)")
    ax_wall.set(xlabel="training seconds (evaluation excluded)", ylabel="held-out accuracy (%)")
    for ax in (ax_loss, ax_lr, ax_acc):
        ax.set_xlim(left=0)  # the first stage's label and boundary sit at step 0
    for ax in (ax_acc, ax_wall):
        ax.set_ylim(-2, 102)  # percent on a fixed scale, so two runs' plots compare at a glance
    for ax in (ax_loss, ax_lr, ax_acc, ax_wall):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw `run_dir`'s curves to `out` (default RUN_DIR/curves.png) and return its path. Refused, with
    nothing written, when the run has no metrics or `out` is not a .png in an existing folder."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "curves.png"
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: the plot is a PNG; name it FILE.png")
    stages = load_run(run_dir)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {out.parent} does not exist")
    fig = draw(stages, title=str(run_dir.resolve().name))
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
