"""A run folder's finished and checkpointed stages belong to the recipe that trained them.

`train_recipe` skips a stage whose final model is saved and resumes one that has a checkpoint. Both are
right only if the recipe asks for what that state was trained with: a stage finished at 30 steps is not
"done" for a recipe that now asks 60, and resuming it at another learning rate mixes two runs. So before a
run starts, the recipe saved in the folder (`recipe.yaml`) and the one given are compared for every stage
that has state: everything that decides its weights (the model, the engine's numerics, that stage's
settings and every stage's before it) must be equal, and a difference is refused with the fields named.
What only changes how a run is watched (logging, checkpoint cadence, periodic evaluation, recomputation
and compilation) or how it is spread (backend, ZeRO) may change freely. A stage that is begun but not
finished may also change its length (`max_steps`, `epochs`: extending a run from its checkpoint) and its
gradient accumulation (resuming on another number of processes at the same global batch); that is
reported, since a new length sets the learning-rate schedule from there on.
"""

from __future__ import annotations

import os
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from mllm.config import ConfigError, EngineConfig, Recipe, StageConfig

#: engine fields that change how a run is spread, kept, logged or stopped, not the weights it trains (the
#: engine carries a checkpoint across backends and ZeRO stages: engine.Trainer.load_checkpoint)
ENGINE_FREE = (
    "backend",
    "zero_config",
    "checkpoint_every",
    "keep_last",
    "log_every",
    "progress",
    "dist_timeout_s",
    "threads",
    "loggers",
    "preemption_signals",
    "checkpoint_retries",
)
#: stage fields likewise (periodic evaluation, activation recomputation, torch.compile, ZeRO)
STAGE_FREE = ("eval_every", "eval", "gradient_checkpointing", "compile", "zero_config")


class RecipeChanged(ConfigError):
    """A run folder holds a stage trained (or begun) with other settings than the recipe asks now."""


def _free(obj: Any, names: tuple[str, ...], default: Any) -> Any:
    return replace(obj, **{n: getattr(default, n) for n in names})


def _trains(recipe: Recipe) -> tuple[Any, EngineConfig, list[StageConfig]]:
    """The parts of a recipe that decide its weights."""
    return (
        recipe.model,
        _free(recipe.engine, ENGINE_FREE, EngineConfig()),
        [_free(s, STAGE_FREE, StageConfig(name=s.name, kind=s.kind)) for s in recipe.stages],
    )


def _same_path(a: str, b: str) -> bool:
    """Two spellings of one path ("runs/x" and "/abs/runs/x" from the same folder, "./runs/x"): a run
    started with a relative folder and re-run with an absolute one asks the same data."""
    return (os.sep in a or os.sep in b) and os.path.abspath(a) == os.path.abspath(b)


def _diff(a: Any, b: Any, where: str) -> list[str]:
    """`where.field: old -> new` for each field that differs, through dataclasses, mappings and sequences
    (so the message names the leaf); a path spelled two ways is the same path."""
    if a == b:
        return []
    if is_dataclass(a) and is_dataclass(b) and type(a) is type(b):
        return [
            c for f in fields(a) for c in _diff(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
        ]
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return [c for k in a for c in _diff(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [c for i, (x, y) in enumerate(zip(a, b, strict=True)) for c in _diff(x, y, f"{where}[{i}]")]
    if isinstance(a, str) and isinstance(b, str) and _same_path(a, b):
        return []
    return [f"{where}: {a!r} -> {b!r}"]


def _changes(
    old: tuple[Any, EngineConfig, list[StageConfig]], new: tuple[Any, EngineConfig, list[StageConfig]]
) -> list[str]:
    """The differences between two `_trains` triples: model, engine, then the stages in order."""
    (old_model, old_engine, old_stages), (model, engine, stages) = old, new
    out = _diff(old_model, model, "model") + _diff(old_engine, engine, "engine")
    if [s.name for s in old_stages] != [s.name for s in stages]:
        return [*out, f"stages: {[s.name for s in old_stages]} -> {[s.name for s in stages]}"]
    for a, b in zip(old_stages, stages, strict=True):
        out += _diff(a, b, f"stages.{a.name}")
    return out


def training_changes(saved: Recipe, recipe: Recipe) -> list[str]:
    """Every weight-deciding difference between two recipes (model, engine, each stage), as
    `field: old -> new`: empty when a run of `saved` is a run of `recipe`. For callers that keep a whole
    run as done (the evidence runner's arms and base variants), where a stage-by-stage check is not reached."""
    return _changes(_trains(saved), _trains(recipe))


#: what may change on a stage that is begun but not finished: its length (extending it from its
#: checkpoint) and its accumulation, which a resume on another number of processes changes to keep the
#: global batch (the recipe does not know the process count, so this is the user's to keep right)
RESUMABLE = ("max_steps", "epochs", "grad_accum")


def check_continuity(saved: Recipe, recipe: Recipe, run_dir: Path, state) -> list[str]:
    """Refuse `recipe` for `run_dir` when a stage with state there (`state(name)`: "final", "checkpoint" or
    None) was trained under `saved` with other weight-deciding settings, or by no stage of `saved`. Returns
    notes for the log (a begun stage whose length changed)."""
    old_model, old_engine, old_stages = _trains(saved)
    model, engine, stages = _trains(recipe)
    old_names = [s.name for s in old_stages]
    notes: list[str] = []
    for k, stage in enumerate(stages):
        has = state(stage.name)
        if has is None:
            continue
        where = f"{run_dir / stage.name}"
        if stage.name not in old_names:
            raise RecipeChanged(
                f"{where} holds a trained stage, but the recipe saved in {run_dir / 'recipe.yaml'} has no stage "
                f"{stage.name!r}; remove that folder to train it again, or train into a new run folder"
            )
        j = old_names.index(stage.name)
        then, now = old_stages[j], stage
        if has == "checkpoint":  # a begun stage: its length and accumulation may change, nothing else
            moved = [
                f"stages.{now.name}.{n}: {getattr(then, n)!r} -> {getattr(now, n)!r}"
                for n in RESUMABLE
                if getattr(then, n) != getattr(now, n)
            ]
            if moved:
                notes.append(
                    f"{where}: resumed from its checkpoint with {'; '.join(moved)} (a new length sets the "
                    "learning-rate schedule from here on)"
                )
            now = replace(now, **{n: getattr(then, n) for n in RESUMABLE})
        # the stage's weights depend on it and on every stage before it
        changes = _changes((old_model, old_engine, old_stages[: j + 1]), (model, engine, [*stages[:k], now]))
        if changes:
            raise RecipeChanged(
                f"{where} was trained (or begun) under other settings than this recipe asks: "
                + "; ".join(changes[:8])
                + ("; ..." if len(changes) > 8 else "")
                + f". Its weights would not be what the recipe says: remove {where} (and the stages after "
                "it) to train it again, or train into a new run folder"
            )
    return notes
