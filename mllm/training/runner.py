"""From a recipe to trained models: build or load the model, run each stage, save what it made.

Run folder:
    RUN/recipe.yaml            the resolved recipe (overrides applied)
    RUN/run.json               stages finished, their final models, wall seconds, skipped samples
    RUN/env.json               per (re)start: git revision + dirty flag, package versions, hardware, world size
    RUN/<stage>/metrics.jsonl  one line per optimiser step
    RUN/<stage>/evals.jsonl    one line per `eval_every` evaluation (when the stage sets it)
    RUN/<stage>/checkpoints/   step-XXXXXXXX folders + `latest`
    RUN/<stage>/final/         the model, saved by its kind (a MultimodalLM folder for kind "mllm",
                               loadable by `mllm chat` / `mllm eval`; see mllm.families)
    RUN/train.lock             host and pid of the process training it (mllm.training.runlock)
A stage whose `final/` holds a complete save is done and skipped on a re-run, so `mllm train` is
restartable. One process trains a run folder at a time; a preemption signal stops it with a checkpoint
(mllm.training.preemption), and the same command resumes it.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from encoders.common import seed_everything
from mllm.config import ConfigError, Recipe, StageConfig, load_recipe, save_recipe
from mllm.families import get_family, get_stage_kind, get_task, resolve_template, resolve_trainable
from mllm.families.mllm import build_model as build_model
from mllm.loading import resolve_model_dir as resolve_model_dir
from mllm.logging_backends import environment_info
from mllm.lora import apply_lora, save_lora_final
from mllm.prior import resolve_ref
from mllm.training import distributed as D
from mllm.training.checkpoint import STEP_RE, atomic_write_text
from mllm.training.continuity import check_continuity
from mllm.training.engine import Evaluator, StageResult, StepEvaluator, Trainer, eval_mode
from mllm.training.preemption import Preempted, PreemptionWatch
from mllm.training.runlock import RunLock, RunLocked


def run_stage(
    model: nn.Module,
    recipe: Recipe,
    stage: StageConfig,
    stage_dir: Path,
    evaluator: Evaluator | None = None,
    preempt: PreemptionWatch | None = None,
) -> StageResult:
    """Train `model` (in place) for one stage and save it to `stage_dir/final`.

    `evaluator` runs every `stage.eval_every` steps on `model` itself, not on the task's training
    module (which may wrap it, e.g. under per-patch heads)."""
    kind = get_stage_kind(stage.kind)
    meta = getattr(model, "meta", None)  # models without a chat template (encoders) train on "plain"
    template = resolve_template(stage, getattr(meta, "template", None) or "plain")
    # What the stage initialises (LoRA adapters, a task's throwaway heads) is drawn from the recipe's
    # seed, not from whatever earlier stages in this process left in the RNG: a run resumed at this
    # stage, or one stage run alone (--stage), starts it exactly as the uninterrupted run did.
    seed_everything(recipe.engine.seed)
    if stage.lora is not None:  # before the task and the engine, so names match on resume (mllm.lora)
        apply_lora(model, stage.lora)
    module, dataset, collate = get_task(kind.task)(model, stage, template)
    evaluate = (
        _bind(evaluator, model, stage) if evaluator is not None and stage.eval_every is not None else None
    )
    trainer = Trainer(
        module,
        dataset,
        collate,
        stage,
        recipe.engine,
        stage_dir,
        resolve_trainable(stage, module),
        evaluate=evaluate,
        preempt=preempt,
    )
    try:
        result = trainer.train()
    except BaseException:
        trainer.close()
        raise
    with trainer.full_weights():
        if D.is_main() and stage.lora is not None:  # final/ merged, final/adapter/ in peft format
            save_lora_final(model, stage.lora, stage_dir / "final")
        elif D.is_main():
            model.save_pretrained(stage_dir / "final")
    D.barrier()
    trainer.close()
    return result


def _bind(evaluator: Evaluator, model: nn.Module, stage: StageConfig) -> StepEvaluator:
    def evaluate(step: int) -> dict[str, Any]:
        with eval_mode(model):  # the Trainer's own eval_mode covers its module, which may not hold `model`
            return evaluator(model, stage, step)

    return evaluate


class NothingToResume(ValueError):
    """`resume=True` on a run folder that holds no checkpoint and no finished stage."""


def _state(stage_dir: Path, family) -> str | None:
    """What a stage folder holds: "final" (a finished model), "checkpoint", or None."""
    if family.is_saved(stage_dir / "final"):
        return "final"
    ckpts = stage_dir / "checkpoints"
    return "checkpoint" if ckpts.is_dir() and any(STEP_RE.match(p.name) for p in ckpts.iterdir()) else None


def has_progress(run_dir: Path, recipe: Recipe) -> bool:
    """Whether `run_dir` holds a checkpoint or a finished stage of `recipe` (something to resume)."""
    family = get_family(recipe.model.kind)
    return any(_state(run_dir / s.name, family) for s in recipe.stages)


def acquire_run_lock(run_dir: Path) -> RunLock | None:
    """The run folder's lock, taken by the main rank; every rank raises the same RunLocked if it is held."""
    lock, error = None, None
    if D.is_main():
        try:
            lock = RunLock(run_dir).acquire()
        except RunLocked as e:
            error = str(e)
    error = next((e for e in D.gather_objects(error) if e), None)
    if error is not None:
        raise RunLocked(error)
    return lock


def train_recipe(
    recipe: Recipe,
    run_dir: str | Path,
    only: list[str] | None = None,
    log=print,
    evaluator: Evaluator | None = None,
    resume: bool = False,
    preempt: PreemptionWatch | None = None,
) -> dict[str, Any]:
    """Run the recipe's stages in order (or `only` those named), each starting from the previous one.

    `evaluator` serves the stages that set `eval_every` (mllm.evaluation.periodic.make_evaluator); it
    is passed in rather than imported because training does not depend on evaluation. `resume=True`
    refuses a run folder with nothing to resume (a requeued job pointed at the wrong folder must not
    start over). The run folder is locked for the duration (RunLocked if another process holds it);
    the recipe's preemption signals stop the run with a checkpoint (Preempted), watched for the call's
    duration, or by `preempt` when the caller holds a watch of its own (the CLI does, until it exits)."""
    run_dir = Path(run_dir)
    stages = [s for s in recipe.stages if only is None or s.name in only]
    if not stages:
        raise ValueError(f"no stage to run; the recipe has {[s.name for s in recipe.stages]}")
    if evaluator is None and any(s.eval_every is not None for s in stages):
        name = next(s.name for s in stages if s.eval_every is not None)
        raise ValueError(
            f"stage {name!r} sets eval_every but train_recipe got no evaluator "
            "(pass evaluator=mllm.evaluation.periodic.make_evaluator(recipe))"
        )
    for s in stages:  # before any stage runs, not hours into the run
        if s.prior is not None and get_stage_kind(s.kind).task != "prior":
            raise ConfigError(
                f"stage {s.name!r}: a `prior:` section is set but its kind {s.kind!r} does not "
                "train with PRIOR weights (kind: prior does)"
            )
    if resume and not has_progress(run_dir, recipe):
        raise NothingToResume(
            f"{run_dir}: nothing to resume (no stage has a checkpoint or a finished model); drop --resume "
            "to start the run there"
        )
    D.init(recipe.engine.backend, recipe.engine.dist_timeout_s)
    own = preempt is None
    watch = PreemptionWatch(recipe.engine.preemption_signals) if own else preempt
    with watch if own else contextlib.nullcontext(watch):
        lock = acquire_run_lock(run_dir)
        try:
            if lock is not None and lock.took_over is not None:
                log(f"took over a stale lock of {run_dir} ({lock.took_over['reason']})")
            return _train_stages(recipe, run_dir, stages, log, evaluator, watch)
        finally:
            if lock is not None:
                lock.release()


def _train_stages(
    recipe: Recipe,
    run_dir: Path,
    stages: list[StageConfig],
    log,
    evaluator: Evaluator | None,
    watch: PreemptionWatch,
) -> dict[str, Any]:
    family = get_family(recipe.model.kind)
    saved = run_dir / "recipe.yaml"
    if saved.is_file():  # every rank checks, so every rank raises the same error
        for note in check_continuity(
            load_recipe(saved), recipe, run_dir, lambda n: _state(run_dir / n, family)
        ):
            log(note)
    if D.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
        _record_environment(run_dir / "env.json")
    D.barrier()
    summary_path = run_dir / "run.json"
    summary: dict[str, Any] = (
        json.loads(summary_path.read_text()) if summary_path.is_file() else {"stages": {}}
    )
    prev_final: Path | None = None
    names = [s.name for s in recipe.stages]
    first = names.index(stages[0].name)
    if first > 0:
        prev_final = run_dir / names[first - 1] / "final"
    corpus = [Path(s.data.json) for s in recipe.stages if s.data.json]
    model_kind = family
    for stage in stages:
        if stage.prior is not None:  # `ref: stage:NAME` is NAME's final LM in this run
            stage = replace(stage, prior=resolve_ref(stage.prior, run_dir))
        stage_dir = run_dir / stage.name
        final = stage_dir / "final"
        if model_kind.is_saved(final):
            log(f"[{stage.name}] already finished: {final}")
            prev_final = final
            continue
        if watch.agreed():  # a signal between stages: the finished ones are saved, nothing to checkpoint
            raise Preempted(watch.signame, None, None, None)
        t0 = time.time()
        if stage.init is not None:
            if stage.init not in names[: names.index(stage.name)]:
                raise ValueError(
                    f"stage {stage.name!r}: init {stage.init!r} is not an earlier stage of the recipe "
                    f"({names[: names.index(stage.name)]})"
                )
            prev_final = run_dir / stage.init / "final"
        if prev_final is not None:
            if not model_kind.is_saved(prev_final):
                raise FileNotFoundError(
                    f"stage {stage.name!r} starts from {prev_final}, which does not exist"
                )
            model = model_kind.load(prev_final)
        else:
            model = model_kind.build(recipe.model, run_dir, corpus, recipe.engine.seed)
        log(f"[{stage.name}] training {resolve_trainable(stage, model)} on {stage.data.json}")
        result = run_stage(model, recipe, stage, stage_dir, evaluator, preempt=watch)
        wall = time.time() - t0
        summary["stages"][stage.name] = {
            "final": str(final),
            "steps": result.steps,
            "final_loss": result.final_loss,
            "wall_s": round(wall, 2),
            "resumed_from": result.resumed_from,
            "skipped": [s.__dict__ for s in result.skipped],
        }
        summary["final"] = str(final)
        if D.is_main():
            atomic_write_text(summary_path, json.dumps(summary, indent=1))
            if result.skipped:
                log(f"[{stage.name}] skipped {len(result.skipped)} bad sample(s):")
                for s in result.skipped:
                    log(f"  - {s.reason}")
            log(
                f"[{stage.name}] done: {result.steps} steps, loss {result.final_loss}, {wall:.1f}s -> {final}"
            )
        prev_final = final
        del model
    return summary


def _record_environment(path: Path) -> None:
    """Append this invocation's git revision, versions and hardware to env.json (one entry per (re)start)."""
    runs = json.loads(path.read_text()).get("runs", []) if path.is_file() else []
    runs.append(environment_info(D.world_size()))
    atomic_write_text(path, json.dumps({"runs": runs}, indent=1))
