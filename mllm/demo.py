"""`mllm demo`: the whole pipeline on a CPU in minutes, with nothing downloaded.

synth (GeoWorld) -> a tiny CLIP with a convolutional image tower trained contrastively on GeoWorld's
captions (recipe clip-resnet-tiny) -> tokenizer + tiny LM pretrained on GeoWorld's text ->
the tower's per-patch warm-up (fine-grained, from scene graphs; its heads become the anchored projector's
rows) -> align -> instruct on fresh scenes every step (projector, LM and the look-token readout, whose
attention is grounded on the scene graphs; recipe tiny-geoworld) -> held-out QA, MMVP-style pairs,
POPE and the encoder's zero-shot retrieval -> a table, `results.json` and `curves.png`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mllm.config import RECIPES_DIR, load_recipe
from mllm.data.conversations import read_records
from mllm.data.geoworld import write_world
from mllm.data.geoworld.pope import SPLITS as POPE_SPLITS
from mllm.evaluation.benchmarks import get_benchmark
from mllm.evaluation.periodic import make_evaluator
from mllm.evaluation.runner import evaluate
from mllm.loading import get_loader
from mllm.model import MultimodalLM
from mllm.plotting import plot_run
from mllm.training.runner import train_recipe

# The packaged recipes (mllm/recipes/), so the demo runs from an installed wheel as from a checkout.
RECIPE = RECIPES_DIR / "tiny-geoworld.yaml"
ENCODER_RECIPE = RECIPES_DIR / "clip-resnet-tiny.yaml"
# CLIP and DCL tie on GeoWorld retrieval at equal compute (docs/results.md); the conv tower reaches mean
# R@1 83.8 in 300 steps (the ViT: 58.2). 120 steps leave the 10-minute budget room for instruct (with 150
# the demo took 588 s of its 600); the per-patch warm-up after it is what teaches shape (docs/results.md,
# "Models that see").
ENCODER_STEPS = 120
DEMO_N = 3000
QUICK = [
    "stages.lm_pretrain.max_steps=6",
    "stages.tower_warmup.max_steps=4",
    "stages.align.max_steps=3",
    "stages.instruct.max_steps=8",
    "stages.lm_pretrain.batch_size=8",
    "stages.tower_warmup.batch_size=8",
    "stages.align.batch_size=8",
    "stages.instruct.batch_size=8",
    "stages.instruct.eval_every=4",
    "stages.instruct.eval.limit=16",
    "engine.checkpoint_every=4",
]
QUICK_ENCODER = [
    "stages.contrastive.max_steps=4",
    "stages.contrastive.batch_size=8",
    "engine.checkpoint_every=4",
]


def write_text_corpus(world: Path) -> Path:
    """Text-only conversations (captions and QA without their images) for the LM's warm start."""
    out = world / "text.json"
    if out.is_file():
        return out
    records: list[dict[str, Any]] = []
    for line in (world / "captions.jsonl").read_text().splitlines():
        c = json.loads(line)
        for kind in ("long", "short"):
            records.append(
                {
                    "id": f"{c['id']}-{kind}",
                    "conversations": [
                        {"from": "human", "value": "Describe a scene."},
                        {"from": "gpt", "value": c[kind]},
                    ],
                }
            )
    for rec in read_records(world / "instruct.json"):
        conv = [
            dict(t, value=t["value"].replace("<image>\n", "").replace("<image>", ""))
            for t in rec["conversations"]
        ]
        records.append({"id": f"{rec['id']}-qa", "conversations": conv})
    out.write_text(json.dumps(records))
    return out


def ensure_world(world: Path, seed: int, n: int | None = None, quick: bool = False, log=print) -> Path:
    """The demo's GeoWorld (written once; an existing one is kept) and its text-only corpus."""
    if not (world / "manifest.json").is_file():
        n_scenes = n or (200 if quick else DEMO_N)
        log(f"[synth] GeoWorld: {n_scenes} training scenes -> {world}")
        kw = (
            dict(n_eval=64, mmvp_pairs=8, pope_questions=24, mathverse_problems=4, refcoco_n=16)
            if quick
            else {}
        )
        write_world(world, seed=seed, n=n_scenes, size=64, **kw)
    write_text_corpus(world)
    return world


def demo_overrides(out: str | Path, seed: int, quick: bool = False) -> list[str]:
    """The overrides that make the demo's recipe the run `run_demo(out, seed=seed)` trains: its world,
    its encoder's tower, its seeds (and the quick sizes). Shared with `mllm evidence`, whose arms are
    this recipe with one change, so an arm's unchanged stages are recognisably the demo's."""
    out = Path(out)
    return [
        f"extra.world={out / 'world'}",
        f"extra.tower={out / 'encoder' / 'contrastive' / 'final' / 'image_tower'}",
        f"engine.seed={seed}",
        f"extra.live_seed={seed + 1}",
        *(QUICK if quick else []),
    ]


def run_demo(
    out: str | Path,
    overrides: list[str] | None = None,
    n: int | None = None,
    quick: bool = False,
    seed: int = 0,
    log=print,
) -> dict[str, Any]:

    out = Path(out)
    world = out / "world"
    timings: dict[str, float] = {}
    t_start = t0 = time.time()
    ensure_world(world, seed, n, quick, log)
    timings["synth"] = round(time.time() - t0, 2)

    encoder = load_recipe(
        ENCODER_RECIPE,
        [
            f"extra.world={world}",
            f"stages.contrastive.max_steps={ENCODER_STEPS}",
            f"engine.seed={seed}",
            *(QUICK_ENCODER if quick else []),
        ],
    )
    enc_summary = train_recipe(encoder, out / "encoder", log=log)
    timings["encoder"] = enc_summary["stages"]["contrastive"]["wall_s"]

    recipe = load_recipe(RECIPE, [*demo_overrides(out, seed, quick), *(overrides or [])])
    summary = train_recipe(recipe, out / "run", log=log, evaluator=make_evaluator(recipe))
    for name, st in summary["stages"].items():
        timings[name] = st["wall_s"]

    t0 = time.time()
    model = MultimodalLM.from_pretrained(summary["final"])
    qa, qa_records = evaluate(model, "qa", world, batch_size=32)
    mmvp, mmvp_records = evaluate(model, "mmvp", world / "mmvp", batch_size=32)
    pope, pope_records = evaluate(model, "pope", world / "pope", batch_size=32)
    retrieval = _encoder_retrieval(enc_summary["final"], world)
    timings["eval"] = round(time.time() - t0, 2)
    cats = qa["per_category"]
    basic = [cats[c] for c in ("colour", "shape", "count") if c in cats]
    results = {
        "qa_accuracy": qa["accuracy"],
        "qa_basic_accuracy": sum(basic) / len(basic) if basic else None,
        "qa_per_category": cats,
        "qa_n": qa["n"],
        "mmvp_pair_accuracy": mmvp["pair_accuracy"],
        "mmvp_question_accuracy": mmvp["question_accuracy"],
        "mmvp_unparsed": mmvp["unparsed"],
        "mmvp_pairs": mmvp["pairs"],
        "pope_accuracy": {split: pope[split]["accuracy"] for split in POPE_SPLITS if split in pope},
        "pope_f1": {split: pope[split]["f1"] for split in POPE_SPLITS if split in pope},
        "pope_yes_ratio": {split: pope[split]["yes_ratio"] for split in POPE_SPLITS if split in pope},
        "pope_mean_f1": pope["mean_f1"],
        "encoder_retrieval": retrieval,
        "wall_s": timings,
        "wall_s_total": round(time.time() - t_start, 2),  # the whole command, model loads and plot included
        "model": summary["final"],
        "quick": quick,
        "seed": seed,
    }
    results["curves"] = str(plot_run(out / "run", out / "curves.png"))
    results["wall_s_total"] = round(time.time() - t_start, 2)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "qa_records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa_records))
    (out / "mmvp_records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mmvp_records))
    (out / "pope_records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pope_records))
    show_results(results, log)
    example = next(iter(json.loads(ln) for ln in (world / "eval" / "qa.jsonl").read_text().splitlines()))
    log(f"\nresults: {out / 'results.json'}")
    log(f"chat:    mllm chat --model {out / 'run'} --image {world / example['image']}")
    return results


def _encoder_retrieval(encoder_dir: str | Path, world: Path) -> dict[str, float]:
    """Zero-shot image<->text R@1/R@5 of the demo's contrastive encoder on held-out GeoWorld."""

    b = get_benchmark("retrieval")
    model = get_loader(b.model_kind).load(Path(encoder_dir)).eval()
    items = b.load(world)
    metrics, _ = b.score(items, b.respond(model, items, batch_size=64))
    return {k: metrics[k] for k in ("mean_R@1", "mean_R@5")}


def show_results(results: dict[str, Any], log=print) -> None:

    table = Table(title="mllm demo: tiny-geoworld (held-out GeoWorld)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("QA accuracy (all categories)", f"{results['qa_accuracy']:.1f}%")
    if results["qa_basic_accuracy"] is not None:
        table.add_row("QA accuracy (colour/shape/count)", f"{results['qa_basic_accuracy']:.1f}%")
    for cat, acc in results["qa_per_category"].items():
        table.add_row(f"  {cat}", f"{acc:.1f}%")
    table.add_row("MMVP-style pair accuracy (chance 25%)", f"{results['mmvp_pair_accuracy']:.1f}%")
    table.add_row("MMVP-style question accuracy (chance 50%)", f"{results['mmvp_question_accuracy']:.1f}%")
    for split, acc in results.get("pope_accuracy", {}).items():
        table.add_row(
            f"POPE {split}: accuracy / F1 / yes-ratio",
            f"{acc:.1f}% / {results['pope_f1'][split]:.1f} / {results['pope_yes_ratio'][split]:.1f}%",
        )
    for key, value in results.get("encoder_retrieval", {}).items():
        table.add_row(f"encoder retrieval {key}", f"{value:.1f}")
    for stage, s in results["wall_s"].items():
        table.add_row(f"wall seconds: {stage}", f"{s:.1f}")
    table.add_row("wall seconds: total", f"{results['wall_s_total']:.1f}")
    Console().print(table)
