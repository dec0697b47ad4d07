"""The seed-methods table of issue 14, item 3: every contrastive / self-supervised pretraining recipe at
equal compute, >= 2 seeds, with CPU-seconds per step, rendered as one markdown table.

Why: issue 14 added 22 methods, each run for 3-20 steps only ("Not yet measured" in docs/results.md,
"## Contrastive encoders (CLIP vs SigLIP vs FILIP vs DCL vs NegCLIP on GeoWorld)"). A comparison means
the same towers, data order, batch and steps for every method of a kind (the recipes' committed
`max_steps`: 100 for the contrastive kind, 150 for the ssl kind), at least two seeds (the seed spread
is as large as most gaps there), and the CPU cost of a step (user CPU-seconds of the training process
divided by its steps), since several methods do more work per step by design.

Protocol (docs/results.md, same commands as the five rows already there, so old and new rows compare):

    mllm synth --out W --seed 0 --n 2000
    mllm train --recipe train/recipes/OBJ-tiny.yaml --out RUN extra.world=W \\
        stages.STAGE.max_steps=N engine.seed=S engine.threads=1          # env OMP_NUM_THREADS=1
    contrastive kind:  mllm eval retrieval --model RUN --data W --out RUN.ret.json
                       mllm eval mmvp_vlm --model RUN --data W/mmvp_vlm --out RUN.vlm.json
    ssl kind:          mllm probe dense --type TYPE --tower RUN/ssl/final/image_tower --world W \\
                           --out RUN.dense.json   # its documented defaults: 1,000 train images, 300 steps, seed 0

Train CPU-s is the training child's user time (`os.wait4`, start-up included, as `/usr/bin/time`'s
`user` was for the old rows); the evaluations' CPU-s are recorded apart and not in CPU-s per step.
`engine.threads=1` is passed because EngineConfig has `threads` (with OMP_NUM_THREADS=1 in the env).

Methods and what is left out:
- contrastive kind (model.kind contrastive, coca/sycoca through model.encoder.coca, albef, degla):
  clip siglip filip dcl negclip convirt mochi cacr mv_infonce coca sycoca albef degla protoclip fdt
  dreamlip laclip align alip clippp cliprefine. All read only a plain `mllm synth` world (captions.jsonl
  with its long / short / noisy / rewrite captions and negatives). degla and mlcd run as committed, from
  random towers (their recipes name `model.init_from` / `model.tower.path` for the papers' fine-tuning
  setting; not used here, so that every row starts from the same place). cliprefine runs its extra
  `refine` stage (30 steps) as committed: its train CPU-s include it, CPU-s per step divides by the
  contrastive stage's steps, and its row is marked "extra stage" (compare it with clip, the pair it
  starts from).
- ssl kind (model.kind ssl, tower only, no text): dino swav supcon pixpro mlcd, scored by the dense
  per-patch probe (no retrieval or MMVP-VLM: they have no text tower).
- Left out: cgvlm (CG-VLM is an option of an MLLM's align stage, with an LM, not a pretrained encoder;
  its comparison is the cgvlm-tiny recipe against `stages.align.cgvlm.weight=0`), and the projection-head
  probe (scripts/probe_projection.py: an analysis of a trained pair, not a training method).

Usage:

    python scripts/methods_table.py run --world W --out DIR [--seeds 0 1] [--methods a b ...] [-j 2] \\
        [--steps N] [--world-n 2000]
    python scripts/methods_table.py table --out DIR

`run` is resumable: a (method, seed) whose DIR/METHOD-sS.json exists is skipped; a failed one writes
DIR/METHOD-sS.err (the failing command and its log's tail) and the others go on; `table` lists failures.
`--steps N` (smoke tests only) overrides the first stage's max_steps; the steps run are read from
RUN/run.json and recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm.config import load_recipe, recipe_names

CONTRASTIVE = [
    "clip",
    "siglip",
    "filip",
    "dcl",
    "negclip",
    "convirt",
    "mochi",
    "cacr",
    "mv_infonce",
    "coca",
    "sycoca",
    "albef",
    "degla",
    "protoclip",
    "fdt",
    "dreamlip",
    "laclip",
    "align",
    "alip",
    "clippp",
    "cliprefine",
]
SSL = ["dino", "swav", "supcon", "pixpro", "mlcd"]
METHODS = CONTRASTIVE + SSL
EXTRA_STAGE = {"cliprefine": "extra stage"}
MLLM = str(Path(sys.executable).with_name("mllm"))
LOG_TAIL = 60


@dataclass
class Plan:
    """What one method runs: its recipe, kind, the stage whose steps are compared, the tower type."""

    method: str
    recipe: str
    kind: str  # "contrastive" | "ssl"
    stage: str
    committed_steps: int
    tower_type: str


@dataclass
class Child:
    """One finished subprocess: its exit status and resource use."""

    cmd: list[str]
    rc: int
    user_s: float
    sys_s: float
    wall_s: float
    log: Path


def plan_for(method: str) -> Plan:
    recipe_name = f"{method}-tiny"
    if recipe_name not in recipe_names():
        raise SystemExit(f"no recipe train/recipes/{recipe_name}.yaml for method {method!r}")
    recipe = load_recipe(recipe_name)
    first = recipe.stages[0]
    kind = "ssl" if recipe.model.kind == "ssl" else "contrastive"
    return Plan(
        method=method,
        recipe=f"train/recipes/{recipe_name}.yaml",
        kind=kind,
        stage=first.name,
        committed_steps=int(first.max_steps or 0),
        tower_type=recipe.model.tower.type,
    )


def write_json(path: Path, obj: Any) -> None:
    """Atomically: a temporary file beside `path`, then os.replace."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def run_child(cmd: list[str], log: Path) -> Child:
    """Run `cmd` with OMP_NUM_THREADS=1, output to `log`; user/sys CPU-s of that child from os.wait4."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.monotonic()
    with log.open("w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return Child(cmd, proc.returncode, usage.ru_utime, usage.ru_stime, time.monotonic() - start, log)


def tail(path: Path, n: int = LOG_TAIL) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])


def ensure_world(world: Path, n: int) -> None:
    if (world / "captions.jsonl").exists() and (world / "mmvp_vlm").exists():
        return
    print(f"synthesising {world} (n={n})", flush=True)
    cmd = [MLLM, "synth", "--out", str(world), "--seed", "0", "--n", str(n)]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL)


def run_one(plan: Plan, seed: int, world: Path, out: Path, steps: int | None) -> str:
    """Train, evaluate and record one (method, seed); returns a one-line status."""
    tag = f"{plan.method}-s{seed}"
    result_path, err_path = out / f"{tag}.json", out / f"{tag}.err"
    if result_path.exists():
        return f"{tag}: done already, skipped"
    err_path.unlink(missing_ok=True)
    run_dir, logs = out / "runs" / tag, out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if run_dir.exists():  # a half-finished earlier try: start over, so CPU-s counts one whole run
        shutil.rmtree(run_dir)
    max_steps = steps if steps is not None else plan.committed_steps
    train_cmd = [
        MLLM,
        "train",
        "--recipe",
        plan.recipe,
        "--out",
        str(run_dir),
        f"extra.world={world}",
        f"stages.{plan.stage}.max_steps={max_steps}",
        f"engine.seed={seed}",
        "engine.threads=1",
    ]

    def fail(child: Child, what: str) -> str:
        err_path.write_text(f"{what} failed (exit {child.rc}): {' '.join(child.cmd)}\nlog: {child.log}\n\n")
        with err_path.open("a") as fh:
            fh.write(tail(child.log) + "\n")
        return f"{tag}: FAILED in {what} (see {err_path})"

    train = run_child(train_cmd, logs / f"{tag}.train.log")
    if train.rc != 0:
        return fail(train, "train")
    run_info = json.loads((run_dir / "run.json").read_text())
    stage_steps = {name: s.get("steps") for name, s in run_info["stages"].items()}
    evals: dict[str, Child] = {}
    metrics: dict[str, Any] = {}
    if plan.kind == "contrastive":
        for bench, data, suffix in (("retrieval", world, "ret"), ("mmvp_vlm", world / "mmvp_vlm", "vlm")):
            dest = out / "runs" / f"{tag}.{suffix}.json"
            cmd = [MLLM, "eval", bench, "--model", str(run_dir), "--data", str(data), "--out", str(dest)]
            evals[bench] = run_child(cmd, logs / f"{tag}.{suffix}.log")
            if evals[bench].rc != 0:
                return fail(evals[bench], f"eval {bench}")
            metrics[bench] = {k: v for k, v in json.loads(dest.read_text()).items() if k != "meta"}
    else:
        tower = Path(run_info["stages"][plan.stage]["final"]) / "image_tower"
        dest = out / "runs" / f"{tag}.dense.json"
        cmd = [MLLM, "probe", "dense", "--type", plan.tower_type, "--tower", str(tower)]
        cmd += ["--world", str(world), "--out", str(dest)]
        evals["probe_dense"] = run_child(cmd, logs / f"{tag}.dense.log")
        if evals["probe_dense"].rc != 0:
            return fail(evals["probe_dense"], "probe dense")
        metrics["probe_dense"] = json.loads(dest.read_text())
    main_steps = stage_steps.get(plan.stage) or 0
    result = {
        "method": plan.method,
        "recipe": plan.recipe,
        "kind": plan.kind,
        "seed": seed,
        "world": str(world),
        "stage": plan.stage,
        "steps": main_steps,
        "steps_overridden": steps is not None,
        "stage_steps": stage_steps,
        "extra_stage": EXTRA_STAGE.get(plan.method),
        "train_cmd": train_cmd,
        "train_cpu_s": round(train.user_s, 2),
        "train_sys_s": round(train.sys_s, 2),
        "train_wall_s": round(train.wall_s, 1),
        "cpu_s_per_step": round(train.user_s / main_steps, 4) if main_steps else None,
        "eval_cpu_s": {k: round(c.user_s, 2) for k, c in evals.items()},
        "eval_wall_s": {k: round(c.wall_s, 1) for k, c in evals.items()},
        "metrics": metrics,
    }
    write_json(result_path, result)
    return f"{tag}: ok, {main_steps} steps, train {train.user_s:.1f} CPU-s ({train.wall_s:.0f} s wall)"


def cmd_run(args: argparse.Namespace) -> int:
    methods = args.methods or METHODS
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"not in this table: {unknown} (known: {' '.join(METHODS)})")
    plans = {m: plan_for(m) for m in methods}
    world, out = Path(args.world).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ensure_world(world, args.world_n)
    # method-major: each method gets its seeds together, so a stopped run leaves whole rows
    jobs = [(plans[m], s) for m in methods for s in args.seeds]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_one, p, s, world, out, args.steps) for p, s in jobs]
        failed = 0
        for f in futures:
            line = f.result()
            failed += "FAILED" in line
            print(line, flush=True)
    print(f"{len(jobs) - failed}/{len(jobs)} ok; `python scripts/methods_table.py table --out {args.out}`")
    return 1 if failed else 0


def mean_half_spread(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{statistics.fmean(values):.1f} ± {(max(values) - min(values)) / 2:.1f}"


def render(out: Path) -> str:
    """One row per method (in METHODS order, then any others found): seeds, mean ± half the seed spread."""
    results: dict[str, list[dict[str, Any]]] = {}
    failures: dict[str, list[str]] = {}
    for p in sorted(out.glob("*-s*.json")):
        r = json.loads(p.read_text())
        results.setdefault(r["method"], []).append(r)
    for p in sorted(out.glob("*-s*.err")):
        method, _, seed = p.stem.rpartition("-s")
        if not (out / f"{p.stem}.json").exists():
            failures.setdefault(method, []).append(seed)
    order = [m for m in METHODS if m in results or m in failures]
    order += sorted((set(results) | set(failures)) - set(order))
    head = (
        "| method | kind | seeds | steps | mean R@1 | mean R@5 | MMVP-VLM avg | colour fg | shape fg "
        "| train CPU-s/step | eval CPU-s | note |"
    )
    lines = [head, "|" + "---|" * 12]
    for m in order:
        rows = sorted(results.get(m, []), key=lambda r: r["seed"])
        seeds = ",".join(str(r["seed"]) for r in rows) or "–"
        kind = rows[0]["kind"] if rows else ("ssl" if m in SSL else "contrastive")
        steps = sorted({r["steps"] for r in rows})
        ret = [r["metrics"].get("retrieval", {}) for r in rows]
        vlm = [r["metrics"].get("mmvp_vlm", {}) for r in rows]
        dense = [r["metrics"].get("probe_dense", {}) for r in rows]

        def col(dicts: list[dict[str, Any]], key: str, scale: float = 1.0) -> str:
            return mean_half_spread([d[key] * scale for d in dicts if key in d])

        per_step = [r["cpu_s_per_step"] for r in rows if r.get("cpu_s_per_step") is not None]
        eval_s = [sum(r["eval_cpu_s"].values()) for r in rows]
        notes = []
        if any(r.get("extra_stage") for r in rows) or m in EXTRA_STAGE:
            notes.append(f"{EXTRA_STAGE.get(m, 'extra stage')} (its CPU-s included)")
        if any(r.get("steps_overridden") for r in rows):
            notes.append("steps overridden (smoke)")
        if m in failures:
            notes.append(f"FAILED seed(s) {','.join(failures[m])}: see {m}-s*.err")
        contrastive = kind == "contrastive"
        lines.append(
            "| "
            + " | ".join(
                [
                    m,
                    kind,
                    f"{len(rows)} ({seeds})",
                    "/".join(map(str, steps)) or "–",
                    col(ret, "mean_R@1") if contrastive else "–",
                    col(ret, "mean_R@5") if contrastive else "–",
                    col(vlm, "average") if contrastive else "–",
                    "–" if contrastive else col(dense, "colour_fg_acc", 100.0),
                    "–" if contrastive else col(dense, "shape_fg_acc", 100.0),
                    f"{statistics.fmean(per_step):.3f}" if per_step else "–",
                    f"{statistics.fmean(eval_s):.1f}" if eval_s else "–",
                    "; ".join(notes),
                ]
            )
            + " |"
        )
    lines += [
        "",
        "R@k and MMVP-VLM in %, mean over seeds ± half the spread between them (mean R@k averages i2t and "
        "t2i); colour/shape fg: the dense probe's foreground-patch accuracy in % (chance 12.5%). "
        "train CPU-s/step: the training process's user CPU-s (start-up included) / the first stage's steps; "
        "eval CPU-s: the evaluations' user CPU-s per run, apart.",
    ]
    return "\n".join(lines)


def cmd_table(args: argparse.Namespace) -> int:
    print(render(Path(args.out)))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and score each (method, seed); resumable")
    r.add_argument("--world", required=True, help="a GeoWorld folder (synthesised here if missing)")
    r.add_argument("--world-n", type=int, default=2000, help="scenes when synthesising the world")
    r.add_argument("--out", required=True)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    r.add_argument("--methods", nargs="+", default=None, help=f"default: all ({' '.join(METHODS)})")
    r.add_argument("-j", "--jobs", type=int, default=2, help="runs at a time (each one thread)")
    r.add_argument("--steps", type=int, default=None, help="smoke tests: the first stage's max_steps")
    r.set_defaults(func=cmd_run)
    t = sub.add_parser("table", help="the markdown table of DIR's results")
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_table)
    args = ap.parse_args()
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
