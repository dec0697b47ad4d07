"""Evaluation during training (`stage.eval_every`): a small held-out slice answered every N optimiser
steps, so accuracy can be drawn against loss and learning rate (`mllm plot`).

Training never imports evaluation (they are separate layers), so the command that starts training
builds the evaluator here and hands it down: `train_recipe(recipe, run, evaluator=make_evaluator(recipe))`.
The engine decides when it runs, on which rank, in eval mode and without touching the training RNG;
this module decides what is asked and how it is scored (the same loaders and scorers as `mllm eval`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from torch import nn

from mllm.config import EvalConfig, Recipe, StageConfig
from mllm.evaluation.benchmarks import Item, get_benchmark, resolve_rule
from mllm.evaluation.runner import generate_responses


def balanced_subset(items: list[Item], limit: int | None) -> list[Item]:
    """The first `limit` items taken round-robin over categories, each category in file order.

    A learning curve over a slice that happened to be mostly one category would show that category's
    curve; round-robin keeps every category in it whatever the file's order. Deterministic, so every
    evaluation of a run (and of a rerun) asks the same questions. Items without a category count as one.
    """
    if limit is None or limit >= len(items):
        return list(items)
    by_cat: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        by_cat[str(it.meta.get("category", ""))].append(it)
    queues = list(by_cat.values())
    picked: list[Item] = []
    i = 0
    while len(picked) < limit:
        for q in queues:
            if i < len(q) and len(picked) < limit:
                picked.append(q[i])
        i += 1
    return picked


class PeriodicEvaluator:
    """An `Evaluator` for train_recipe: (model, stage, step) -> the scored slice's metrics.

    Items are loaded (and their files checked) once per distinct `eval` section and kept, so each
    evaluation costs only the answering. `check(stages)` loads them up front, so a wrong path or
    benchmark name fails before training rather than at the first evaluation.
    """

    def __init__(self) -> None:
        self._items: dict[str, list[Item]] = {}

    @staticmethod
    def _key(cfg: EvalConfig) -> str:
        return json.dumps([cfg.benchmark, str(cfg.data), cfg.limit, cfg.options], sort_keys=True, default=str)

    def items(self, stage: StageConfig) -> list[Item]:
        cfg = stage.eval
        if cfg is None or not cfg.data:
            raise ValueError(f"stage {stage.name!r}: eval_every needs `eval.data`")
        key = self._key(cfg)
        if key not in self._items:
            b = get_benchmark(cfg.benchmark)
            try:
                _, options = resolve_rule(b, cfg.options)
                items = b.load(Path(cfg.data), **options)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"stage {stage.name!r} eval: {e}") from e
            except ValueError as e:
                raise ValueError(f"stage {stage.name!r} eval: {e}") from e
            if not items:
                raise ValueError(
                    f"stage {stage.name!r} eval: benchmark {cfg.benchmark!r} at {cfg.data} has no items"
                )
            self._items[key] = balanced_subset(items, cfg.limit)
        return self._items[key]

    def check(self, stages: list[StageConfig]) -> None:
        for stage in stages:
            if stage.eval_every is not None:
                self.items(stage)

    def __call__(self, model: nn.Module, stage: StageConfig, step: int) -> dict[str, Any]:
        cfg = stage.eval
        assert cfg is not None
        b = get_benchmark(cfg.benchmark)
        items = self.items(stage)
        rule, options = resolve_rule(b, cfg.options)
        if b.respond is not None:  # a contrastive model answers by similarity (mmvp_vlm, retrieval)
            responses = b.respond(model, items, batch_size=cfg.batch_size, **options)
        else:
            responses = generate_responses(
                model, items, cfg.batch_size, cfg.max_new_tokens or b.max_new_tokens
            )
        metrics, _ = b.score(items, responses, **options)
        # Scalars and the per-category map: what a curve can draw; per-item records stay with `mllm eval`.
        out: dict[str, Any] = {"benchmark": cfg.benchmark, "rule": rule}
        for k, v in metrics.items():
            if k == "per_category" or (isinstance(v, (int, float)) and not isinstance(v, bool)):
                out[k] = v
        return out


def make_evaluator(recipe: Recipe | None = None, only: list[str] | None = None) -> PeriodicEvaluator:
    """The evaluator `mllm train` (and the demo) hand to train_recipe; given the recipe, the `eval`
    section of every stage that will run (`only`: train_recipe's) is loaded and checked now, before
    any training step."""
    ev = PeriodicEvaluator()
    if recipe is not None:
        ev.check([s for s in recipe.stages if only is None or s.name in only])
    return ev
