"""PRIOR vs plain next-token prediction on GeoWorld, at equal steps, over several seeds.

    python scripts/prior_experiment.py --out runs/prior_exp --seeds 0 1 2

One world and one shared base (`lm_pretrain`, `tower_warmup`, `prior_ref` of
recipe `prior-tiny`, seed 0) feed both arms, so the arms differ only in the alignment
loss: the `prior` stage with the recipe's alpha (PRIOR) or with alpha = 0, which is exactly the plain
next-token loss (tests/test_prior.py proves the equality). Each arm then runs the same `instruct`
stage; both stages use the arm's seed. Scored on the world's held-out QA and POPE sets.

Writes OUT/results.json (every run's metrics + mean/std per arm) and OUT/weights.json (the weight
histogram and the per-token mean weights of the PRIOR cache), and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

BASE_STAGES = ("lm_pretrain", "tower_warmup", "prior_ref")


def _recipe(world: Path, seed: int, alpha: float, args: argparse.Namespace):
    from mllm.config import load_recipe

    trainable = f"{{projector: {args.prior_lr:g}, lm: {args.prior_lm_lr:g}}}"
    return load_recipe(
        "prior-tiny",
        [
            f"extra.world={world}",
            f"engine.seed={seed}",
            f"stages.prior.prior.alpha={alpha}",
            f"stages.prior.max_steps={args.prior_steps}",
            f"stages.prior.trainable={trainable}",
            f"stages.instruct.max_steps={args.instruct_steps}",
            "engine.checkpoint_every=0",
            f"engine.threads={args.threads}",
        ],
    )


def _link_base(base: Path, run: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    for stage in BASE_STAGES:
        dst = run / stage
        if not dst.exists():
            dst.symlink_to((base / stage).resolve(), target_is_directory=True)


def _evaluate(model_dir: str, world: Path, out: Path) -> dict:
    from mllm.evaluation.runner import evaluate
    from mllm.model import MultimodalLM

    done = out / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    model = MultimodalLM.from_pretrained(model_dir)
    qa, _ = evaluate(model, "qa", world, batch_size=32)
    pope, _ = evaluate(model, "pope", world / "pope", batch_size=32)
    m = {
        "qa_accuracy": qa["accuracy"],
        "qa_per_category": qa["per_category"],
        "pope_mean_f1": pope["mean_f1"],
        "pope": {s: {k: pope[s][k] for k in ("f1", "accuracy", "yes_ratio")} for s in pope if s != "mean_f1"},
    }
    done.write_text(json.dumps(m, indent=1))
    return m


def weight_report(cache_dir: Path, world: Path, tokenizer_dir: Path, top: int = 12) -> dict:
    """Histogram of the PRIOR weights and the tokens that got the least and the most weight."""
    import torch
    from safetensors.torch import load_file

    from mllm.chat import IGNORE_INDEX, encode_conversation
    from mllm.data.conversations import read_records
    from mllm.tokenizer import load_tokenizer

    weights = load_file(str(cache_dir / "weights.safetensors"))
    tok = load_tokenizer(tokenizer_dir)
    per_token: dict[str, list[float]] = defaultdict(list)
    example = None
    for rec in read_records(world / "align.json")[:600]:
        w = weights[str(rec["id"])]
        enc = encode_conversation(
            rec["conversations"],
            tok,
            "plain",
            tok.convert_tokens_to_ids("<image>"),
            1,
            num_images=1,
            max_length=512,
            sample=str(rec["id"]),
        )
        ids = enc["input_ids"][enc["labels"] != IGNORE_INDEX]
        pieces = [tok.decode([int(t)]) for t in ids]
        for p, x in zip(pieces, w.tolist()):
            per_token[p].append(x)
        if example is None:
            example = [[p, round(x, 3)] for p, x in zip(pieces, w.tolist())]
    allw = torch.cat(list(weights.values()))
    edges = [0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, float("inf")]
    hist = {f"[{a}, {b})": int(((allw >= a) & (allw < b)).sum()) for a, b in zip(edges, edges[1:])}
    means = {p: sum(v) / len(v) for p, v in per_token.items() if len(v) >= 20}
    ranked = sorted(means.items(), key=lambda kv: kv[1])
    return {
        "tokens": int(allw.numel()),
        "histogram": hist,
        "lowest": [[p, round(m, 3)] for p, m in ranked[:top]],
        "highest": [[p, round(m, 3)] for p, m in ranked[-top:][::-1]],
        "example": example,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/prior_exp")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=3000, help="training scenes")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--prior-steps", type=int, default=150)
    ap.add_argument("--prior-lr", type=float, default=1e-3, help="projector learning rate in the prior stage")
    ap.add_argument("--prior-lm-lr", type=float, default=2e-4, help="LM learning rate in the prior stage")
    ap.add_argument("--instruct-steps", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from mllm.data.geoworld import write_world
    from mllm.demo import write_text_corpus
    from mllm.training.runner import train_recipe

    out = Path(args.out)
    world = out / "world"
    if not (world / "manifest.json").is_file():
        write_world(world, seed=0, n=args.n, size=64)
    write_text_corpus(world)
    base = out / "base"
    t0 = time.time()
    train_recipe(_recipe(world, 0, args.alpha, args), base, only=list(BASE_STAGES))
    print(f"[base] {time.time() - t0:.0f}s")

    runs: dict[str, dict[int, dict]] = {"ntp": {}, "prior": {}}
    for seed in args.seeds:
        for arm, alpha in (("ntp", 0.0), ("prior", args.alpha)):
            run = out / f"{arm}-s{seed}"
            _link_base(base, run)
            t0 = time.time()
            summary = train_recipe(_recipe(world, seed, alpha, args), run, only=["prior", "instruct"])
            m = _evaluate(summary["final"], world, run)
            m["wall_s"] = {k: v["wall_s"] for k, v in summary["stages"].items()}
            runs[arm][seed] = m
            print(
                f"[{arm} seed {seed}] QA {m['qa_accuracy']:.1f}  POPE mean F1 {m['pope_mean_f1']:.1f}  "
                f"({time.time() - t0:.0f}s)",
                flush=True,
            )

    def agg(key) -> dict[str, dict[str, float]]:
        res = {}
        for arm, by_seed in runs.items():
            xs = [key(m) for m in by_seed.values()]
            res[arm] = {
                "mean": statistics.mean(xs),
                "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                "runs": xs,
            }
        return res

    splits = sorted(next(iter(runs["ntp"].values()))["pope"])
    summary = {
        "settings": vars(args),
        "runs": runs,
        "qa_accuracy": agg(lambda m: m["qa_accuracy"]),
        "pope_mean_f1": agg(lambda m: m["pope_mean_f1"]),
    }
    for s in splits:
        summary[f"pope_{s}_f1"] = agg(lambda m, s=s: m["pope"][s]["f1"])
        summary[f"pope_{s}_yes_ratio"] = agg(lambda m, s=s: m["pope"][s]["yes_ratio"])
    (out / "results.json").write_text(json.dumps(summary, indent=1))

    caches = sorted((world / "prior_cache").glob("align-*"))
    for c in caches:
        fp = json.loads((c / "manifest.json").read_text())["fingerprint"]
        if abs(float(fp["alpha"]) - args.alpha) < 1e-9:
            (out / "weights.json").write_text(
                json.dumps(weight_report(c, world, base / "tokenizer"), indent=1)
            )

    print("\n| metric | NTP (mean ± std) | PRIOR (mean ± std) |\n|---|---|---|")
    for k, v in summary.items():
        if k != "runs" and isinstance(v, dict) and "ntp" in v:
            print(
                f"| {k} | {v['ntp']['mean']:.1f} ± {v['ntp']['std']:.1f} | "
                f"{v['prior']['mean']:.1f} ± {v['prior']['std']:.1f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
