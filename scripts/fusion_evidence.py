"""Fusion evidence at a small equal budget: CLIP-only vs MoF (additive at several alpha, interleaved) on
GeoWorld MMVP, and CLIP-only vs CLIP + geometric encoder + router (soft / constant) on GeoWorld MathVerse.

Every configuration starts from the same finished tiny-geoworld model (`--base`: its CLIP-style tower,
LM and tokenizer), gets fresh projectors (and router) and the same `align` + `instruct` steps
(`--align-steps`, `--instruct-steps`); only the vision side differs. Each run is then scored with
`mllm eval` on the world's MMVP set (MoF configurations), MathVerse set (router configurations) or both
(CLIP-only). Results: OUT/<config>-s<seed>/{mmvp,mathverse}.json and a
table of mean ± sample standard deviation over seeds in OUT/summary.json.

    python scripts/fusion_evidence.py --world W --base B --dino D --geo G --out OUT [--seeds 0 1 2]
        [--configs clip add50 add25 inter router router_const]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MOF = "mof-additive-tiny"  # packaged recipes, by name
SVE = "svemath-tiny"
# name -> (recipe, overrides); all share the align/instruct budget of the two tiny recipes (equal).
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "clip": (MOF, ["model.fusion=null"]),
    "add75": (MOF, ["model.fusion.alpha=0.75"]),
    "add50": (MOF, ["model.fusion.alpha=0.5"]),
    "add25": (MOF, ["model.fusion.alpha=0.25"]),
    "inter": (MOF, ["model.fusion.type=mof_interleaved", "model.max_length=320"]),
    "router": (SVE, ["model.fusion.router_mode=soft"]),
    "router_const": (SVE, ["model.fusion.router_mode=constant"]),
}
# Which benchmark each configuration is compared on (CLIP-only is the baseline of both).
BENCHES: dict[str, tuple[str, ...]] = {
    name: ("mmvp", "mathverse")
    if name == "clip"
    else ("mathverse",)
    if name.startswith("router")
    else ("mmvp",)
    for name in CONFIGS
}


def run(cmd: list[str], log: Path) -> float:
    t0 = time.time()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.time() - t0


def one(name: str, seed: int, a: argparse.Namespace) -> dict:
    out = Path(a.out) / f"{name}-s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    recipe, overrides = CONFIGS[name]
    extra = [f"extra.world={a.world}", f"extra.base={a.base}", f"extra.dino={a.dino}", f"extra.geo={a.geo}"]
    if recipe == SVE:
        extra = [e for e in extra if not e.startswith("extra.dino")]
    else:
        extra = [e for e in extra if not e.startswith("extra.geo")]
    budget = [f"stages.align.max_steps={a.align_steps}", f"stages.instruct.max_steps={a.instruct_steps}"]
    walls = {
        "train": run(
            [
                sys.executable,
                "-m",
                "mllm.cli",
                "train",
                "--recipe",
                recipe,
                "--out",
                str(out / "run"),
                *extra,
                *overrides,
                *budget,
                f"engine.seed={seed}",
                "engine.threads=1",
            ],
            log,
        )
    }
    res: dict = {"config": name, "seed": seed, "budget": budget}
    for bench in BENCHES[name]:
        walls[bench] = run(
            [
                sys.executable,
                "-m",
                "mllm.cli",
                "eval",
                bench,
                "--model",
                str(out / "run"),
                "--data",
                str(Path(a.world) / bench),
                "--out",
                str(out / f"{bench}.json"),
            ],
            log,
        )
        res[bench] = json.loads((out / f"{bench}.json").read_text())
    res["wall_s"] = {k: round(v, 1) for k, v in walls.items()}
    (out / "result.json").write_text(json.dumps(res, indent=1))
    return res


def _metrics(res: dict) -> dict[str, float]:
    """The numbers the table reports, flattened (percent)."""
    m = res.get("mmvp", {})
    v = res.get("mathverse", {})
    flat = {f"mmvp.{k}": float(x) for k, x in m.items() if isinstance(x, (int, float))}
    for k, x in v.items():
        if isinstance(x, (int, float)):
            flat[f"mathverse.{k}"] = float(x)
        elif isinstance(x, dict):
            flat.update(
                {f"mathverse.{k}.{kk}": float(xx) for kk, xx in x.items() if isinstance(xx, (int, float))}
            )
    return flat


def summarise(out: Path) -> dict:
    rows: dict[str, list[dict[str, float]]] = {}
    for p in sorted(out.glob("*/result.json")):
        res = json.loads(p.read_text())
        rows.setdefault(res["config"], []).append(_metrics(res))
    table = {}
    for name, runs in rows.items():
        keys = sorted(set.intersection(*(set(r) for r in runs)))
        table[name] = {
            "n": len(runs),
            **{
                k: [
                    round(statistics.mean(r[k] for r in runs), 2),
                    round(statistics.stdev(r[k] for r in runs), 2) if len(runs) > 1 else 0.0,
                ]
                for k in keys
            },
        }
    (out / "summary.json").write_text(json.dumps(table, indent=1))
    return table


def markdown(table: dict) -> str:
    """The two comparison tables of docs/results.md (mean ± sample std over seeds, percent)."""

    def cell(row: dict, key: str) -> str:
        return f"{row[key][0]:.1f} ± {row[key][1]:.1f}" if key in row else "–"

    lines = ["| config | seeds | MMVP pair acc. | MMVP question acc. |", "|---|---|---|---|"]
    for name in ("clip", "add75", "add50", "add25", "inter"):
        if name in table and "mmvp.pair_accuracy" in table[name]:
            r = table[name]
            lines.append(
                f"| {name} | {r['n']} | {cell(r, 'mmvp.pair_accuracy')} | {cell(r, 'mmvp.question_accuracy')} |"
            )
    versions = ("Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only")
    lines += [
        "",
        "| config | seeds | all | " + " | ".join(versions) + " | Text Only |",
        "|---|---|---|" + "---|" * (len(versions) + 1),
    ]
    for name in ("clip", "router", "router_const"):
        if name in table and "mathverse.all" in table[name]:
            r = table[name]
            cells = [cell(r, f"mathverse.versions.{v}") for v in versions]
            lines.append(
                f"| {name} | {r['n']} | {cell(r, 'mathverse.all')} | "
                + " | ".join(cells)
                + f" | {cell(r, 'mathverse.text_only')} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for k in ("world", "base", "dino", "geo"):
        p.add_argument(f"--{k}")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--align-steps", type=int, default=20)
    p.add_argument("--instruct-steps", type=int, default=40)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--summarise-only", action="store_true", help="print the tables of what OUT holds")
    a = p.parse_args()
    if a.summarise_only:
        print(markdown(summarise(Path(a.out))))
        return
    for seed in a.seeds:
        for name in a.configs:
            if (Path(a.out) / f"{name}-s{seed}" / "result.json").is_file():
                continue
            res = one(name, seed, a)
            print(json.dumps({"config": name, "seed": seed, "wall_s": res["wall_s"]}), flush=True)
    print(json.dumps(summarise(Path(a.out)), indent=1))


if __name__ == "__main__":
    main()
