"""Is the data pipeline ever the bottleneck? GeoWorld rendering, and dataset + collate vs a training step.

    python bench/data.py            # the demo recipe's instruct stage (recipe tiny-geoworld)
    python bench/data.py --quick

1. GeoWorld images/s: scene sampling + PIL rendering at the recipe's 64 px (what `mllm synth` does
   per training image, before PNG encoding).
2. Loader samples/s: `ConversationDataset` (PNG decode, tower preprocessing, chat template,
   tokenisation, label masks; for a live stage such as the demo's instruct, `LiveWorldDataset`: a scene
   drawn and rendered per sample instead of a PNG decoded) + `Collator` through a DataLoader with the stage's default workers
   (`data.num_workers`, 0 = in the training process), over a world written by `write_world`.
3. Training samples/s: one step (forward, backward, AdamW) of the recipe's model on the same
   batches, with the stage's trainable modules and precision (fp32 in the demo recipe).
The recipe's tower is the demo's trained clip-resnet-tiny image tower: the benchmark trains one for a single
step in its temporary folder (same architecture, so the same cost), so it runs on a fresh checkout.
Loader and step alternate per round. `loader_headroom` = loader samples/s / training samples/s:
how many times faster the loader produces batches than a step consumes them (target >= 5).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import alternate, machine, median, result
from torch.utils.data import DataLoader

from mllm.config import load_recipe
from mllm.data.batch import model_inputs
from mllm.data.conversations import Collator
from mllm.data.geoworld import render, write_world
from mllm.data.geoworld.sampling import world_scene
from mllm.demo import ENCODER_RECIPE, RECIPE, write_text_corpus
from mllm.families import get_stage_kind, get_task, resolve_template, resolve_trainable
from mllm.training.optim import build_optimizer, param_groups, set_trainable
from mllm.training.runner import build_model, train_recipe


def render_rate(n: int, size: int, seed: int = 0) -> float:
    rng = random.Random(seed)
    t0 = time.perf_counter()
    for _ in range(n):
        render(world_scene(rng, size))
    return n / (time.perf_counter() - t0)


def tiny_tower(world: Path, out: Path) -> Path:
    """An image tower shaped as the demo's (clip-resnet-tiny), trained one step: what the recipe's tower path needs."""
    enc = load_recipe(
        ENCODER_RECIPE,
        [
            f"extra.world={world}",
            "stages.contrastive.max_steps=1",
            "stages.contrastive.batch_size=8",
            "engine.checkpoint_every=0",
        ],
    )
    return Path(train_recipe(enc, out, log=lambda *_: None)["final"]) / "image_tower"


def stage_dataset(stage, model):
    """The stage's dataset exactly as training builds it, through the stage kind's task: scenes drawn and
    rendered per sample for a live stage (the demo's instruct), else its LLaVA-format file."""
    template = resolve_template(stage, model.meta.template)
    return get_task(get_stage_kind(stage.kind).task)(model, stage, template)[1]


def align_cache_speedup(
    recipe_path: Path, overrides: list[str], tmp: Path, steps: int, rounds: int, log
) -> dict:
    """The recipe's `align` stage (tower frozen) alone, without and with `data.feature_cache`, alternating.

    Each run trains `steps` steps from the same fresh model; the per-step seconds come from the
    runs' metrics.jsonl (first step dropped: start-up). The cache is built before the first cached
    run (its time is reported apart) and reused by the later ones, as across epochs and runs.
    """
    import json

    from mllm.config import recipe_from_dict as from_tree
    from mllm.config import to_dict

    base = to_dict(load_recipe(recipe_path, overrides))
    align = next(st for st in base["stages"] if st["kind"] == "align")
    align.update(max_steps=steps, warmup_ratio=0.0)
    base["stages"] = [align]
    base["engine"].update(backend="torch", checkpoint_every=0, progress=False)
    per_step: dict[str, list[float]] = {"plain": [], "cached": []}
    build_s = None
    for r in range(rounds):
        for name, on in (("plain", False), ("cached", True)):
            tree = json.loads(json.dumps(base))
            tree["stages"][0]["data"]["feature_cache"] = on
            run = tmp / f"align-{name}-{r}"
            t0 = time.perf_counter()
            train_recipe(from_tree(tree), run, log=lambda *_: None)
            wall = time.perf_counter() - t0
            rows = [json.loads(x) for x in (run / "align" / "metrics.jsonl").read_text().splitlines()]
            step_s = [x["step_s"] for x in rows[1:]]
            per_step[name] += step_s
            if on and build_s is None:
                build_s = wall - sum(x["step_s"] for x in rows)  # includes model build + save, as for plain
            log(f"align {name} round {r + 1}: median step {median(step_s):.3f}s, wall {wall:.1f}s")
    return {
        "align_cache_speedup": round(median(per_step["plain"]) / median(per_step["cached"]), 3),
        "align_step_s": {k: round(median(v), 4) for k, v in per_step.items()},
        "align_cached_first_run_overhead_s": round(build_s or 0.0, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--stage", default="instruct", help="the recipe stage to measure (default instruct)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None, help="override data.num_workers")
    ap.add_argument(
        "--align-cache",
        action="store_true",
        help="also time the align stage without / with the frozen-tower feature cache",
    )
    ap.add_argument("--align-steps", type=int, default=20)
    args = ap.parse_args()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    n_scenes = 96 if args.quick else 400
    rounds = 2 if args.quick else args.rounds

    images_per_s = render_rate(50 if args.quick else 300, 64)
    log(f"GeoWorld rendering: {images_per_s:.0f} images/s")

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        world = Path(tmp) / "world"
        t0 = time.perf_counter()
        write_world(
            world,
            seed=0,
            n=n_scenes,
            size=64,
            mmvp_pairs=8,
            pope_questions=12,
            refcoco_n=8,
            mathverse_problems=2,
            mmvp_vlm_pairs=1,
        )
        write_text_corpus(world)  # the demo's text.json (the tokenizer is trained on the recipe's files)
        log(f"write_world n={n_scenes}: {time.perf_counter() - t0:.1f}s")
        overrides = [f"extra.world={world}", f"extra.tower={tiny_tower(world, Path(tmp) / 'encoder')}"]
        recipe = load_recipe(RECIPE, overrides)
        stage = recipe.stage(args.stage)
        workers = stage.data.num_workers if args.workers is None else args.workers
        model = build_model(
            recipe.model, Path(tmp) / "run", [Path(s.data.json) for s in recipe.stages if s.data.json], 0
        )
        ds = stage_dataset(stage, model)
        collate = Collator(model.tokenizer.pad_token_id)
        bs = stage.batch_size
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
        batches = [order[i : i + bs] for i in range(0, len(order) - bs + 1, bs)]
        loader_iter = iter(())

        def next_loader_batch():
            nonlocal loader_iter
            try:
                return next(loader_iter)
            except StopIteration:
                loader_iter = iter(
                    DataLoader(
                        ds,
                        batch_sampler=batches,
                        collate_fn=collate,
                        num_workers=workers,
                        persistent_workers=workers > 0,
                    )
                )
                return next(loader_iter)

        trainable = resolve_trainable(stage)
        set_trainable(model, trainable)
        opt = build_optimizer(param_groups(model, trainable, stage.weight_decay), tuple(stage.betas))
        fixed = collate([ds[i] for i in batches[0]])
        inputs = model_inputs(fixed)
        model.train()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.engine.precision == "bf16")

        def train_step():
            with autocast:
                loss = model(**inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        # A loader round is several batches, so a DataLoader restart or worker start-up is amortised
        # as it is in training (one iterator per stage).
        k = 4
        times = alternate(
            {"loader": lambda: [next_loader_batch() for _ in range(k)], "train_step": train_step},
            rounds,
            warmup=1,
            log=log,
        )
        extra = {}
        if args.align_cache:
            extra = align_cache_speedup(
                RECIPE,
                overrides,
                Path(tmp),
                4 if args.quick else args.align_steps,
                1 if args.quick else 2,
                log,
            )
    loader_sps = k * bs / median(times["loader"])
    train_sps = bs / median(times["train_step"])
    result(
        {
            "loader_headroom": round(loader_sps / train_sps, 2),
            "geoworld_images_per_s": round(images_per_s, 1),
            "loader_samples_per_s": round(loader_sps, 1),
            "train_samples_per_s": round(train_sps, 1),
            "stage": args.stage,
            "batch_size": bs,
            "num_workers": workers,
            "precision": recipe.engine.precision,
            "rounds": rounds,
            "config": "quick" if args.quick else "default",
            **extra,
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
