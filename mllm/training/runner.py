"""From a recipe to trained models: build or load the model, run each stage, save what it made.

Run folder:
    RUN/recipe.yaml            the resolved recipe (overrides applied)
    RUN/run.json               stages finished, their final models, wall seconds, skipped samples
    RUN/env.json               per (re)start: git revision + dirty flag, package versions, hardware, world size
    RUN/<stage>/metrics.jsonl  one line per optimiser step
    RUN/<stage>/evals.jsonl    one line per `eval_every` evaluation (when the stage sets it)
    RUN/<stage>/checkpoints/   step-XXXXXXXX folders + `latest`
    RUN/<stage>/final/         the model, saved by its kind (a MultimodalLM folder for kind "mllm",
                               loadable by `mllm chat` / `mllm eval`; see mllm.training.models)
A stage whose `final/` holds a complete save is done and skipped on a re-run, so `mllm train` is
restartable.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from torch import nn

from mllm.config import ModelConfig, Recipe, StageConfig, save_recipe
from mllm.data.conversations import read_records
from mllm.model import MultimodalLM, build_lm
from mllm.tokenizer import ensure_image_token, load_tokenizer, train_tokenizer
from mllm.training import distributed as D
from mllm.training.checkpoint import atomic_write_text
from mllm.training.engine import Evaluator, StageResult, StepEvaluator, Trainer, eval_mode, seed_everything
from mllm.training.models import get_model_kind
from mllm.training.stages import get_stage_kind, resolve_template, resolve_trainable
from mllm.training.tasks import get_task


def corpus_from_records(paths: list[Path]) -> list[str]:
    """Every turn's text in the given LLaVA files (the default tokenizer is trained on them)."""
    texts = []
    for p in paths:
        for rec in read_records(p):
            for turn in rec.get("conversations", []) if isinstance(rec, dict) else []:
                if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                    texts.append(turn["value"].replace("<image>", ""))
    return texts


def build_model(cfg: ModelConfig, run_dir: Path, corpus_files: list[Path], seed: int) -> MultimodalLM:
    """A fresh model from the recipe: tokenizer (given or trained here), tower, projector, LM."""
    if cfg.init_from:
        return MultimodalLM.from_pretrained(cfg.init_from)
    seed_everything(seed)
    cfg = _local_paths(cfg)
    if cfg.tokenizer.path:
        tok = load_tokenizer(cfg.tokenizer.path, cfg.lm.trust_remote_code)
    elif cfg.lm.path:
        tok = load_tokenizer(cfg.lm.path, cfg.lm.trust_remote_code)
    else:
        tok_dir = run_dir / "tokenizer"
        if tok_dir.is_dir():
            tok = load_tokenizer(tok_dir)
        else:
            tok = train_tokenizer(corpus_from_records(corpus_files), cfg.tokenizer.vocab_size)
            if D.is_main():
                tok.save_pretrained(str(tok_dir))
    ensure_image_token(tok, cfg.tokenizer.image_token)
    lm = build_lm(cfg.lm.path, cfg.lm.config, len(tok), cfg.lm.attn_implementation, cfg.lm.trust_remote_code)
    return MultimodalLM.build(cfg.tower, cfg.projector, lm, tok, cfg.tokenizer.image_token, cfg.template,
                              cfg.max_length, box_format=cfg.box_format, fusion=cfg.fusion,
                              image_placement=cfg.image_placement)


def _local_paths(cfg: ModelConfig) -> ModelConfig:
    """Tower/LM/tokenizer paths as local folders; a hub name is fetched only with `allow_network`."""
    import dataclasses

    from mllm.hf_import import resolve_model_path

    def local(path: str | None, what: str) -> str | None:
        return resolve_model_path(path, cfg.allow_network, what) if path else path

    return dataclasses.replace(
        cfg, tower=dataclasses.replace(cfg.tower, path=local(cfg.tower.path, "model.tower.path")),
        lm=dataclasses.replace(cfg.lm, path=local(cfg.lm.path, "model.lm.path")),
        tokenizer=dataclasses.replace(cfg.tokenizer, path=local(cfg.tokenizer.path, "model.tokenizer.path")))


def run_stage(model: nn.Module, recipe: Recipe, stage: StageConfig, stage_dir: Path,
              evaluator: Evaluator | None = None) -> StageResult:
    """Train `model` (in place) for one stage and save it to `stage_dir/final`.

    `evaluator` runs every `stage.eval_every` steps on `model` itself, not on the task's training
    module (which may wrap it, e.g. under per-patch heads)."""
    kind = get_stage_kind(stage.kind)
    meta = getattr(model, "meta", None)  # models without a chat template (encoders) train on "plain"
    template = resolve_template(stage, getattr(meta, "template", None) or "plain")
    if stage.lora is not None:  # before the task and the engine, so names match on resume (mllm.lora)
        from mllm.lora import apply_lora

        apply_lora(model, stage.lora)
    module, dataset, collate = get_task(kind.task)(model, stage, template)
    evaluate = _bind(evaluator, model, stage) if evaluator is not None and stage.eval_every is not None else None
    trainer = Trainer(module, dataset, collate, stage, recipe.engine, stage_dir, resolve_trainable(stage, module),
                      evaluate=evaluate)
    result = trainer.train()
    with trainer.full_weights():
        if D.is_main() and stage.lora is not None:  # final/ merged, final/adapter/ in peft format
            from mllm.lora import save_lora_final

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


def train_recipe(recipe: Recipe, run_dir: str | Path, only: list[str] | None = None,
                 log=print, evaluator: Evaluator | None = None) -> dict[str, Any]:
    """Run the recipe's stages in order (or `only` those named), each starting from the previous one.

    `evaluator` serves the stages that set `eval_every` (mllm.evaluation.periodic.make_evaluator); it
    is passed in rather than imported because training does not depend on evaluation."""
    run_dir = Path(run_dir)
    stages = [s for s in recipe.stages if only is None or s.name in only]
    if not stages:
        raise ValueError(f"no stage to run; the recipe has {[s.name for s in recipe.stages]}")
    if evaluator is None and any(s.eval_every is not None for s in stages):
        name = next(s.name for s in stages if s.eval_every is not None)
        raise ValueError(f"stage {name!r} sets eval_every but train_recipe got no evaluator "
                         "(pass evaluator=mllm.evaluation.periodic.make_evaluator(recipe))")
    D.init(recipe.engine.backend, recipe.engine.dist_timeout_s)
    from mllm import prior

    prior.configure_from_extra(recipe.extra, run_dir)  # PRIOR's settings live in `extra.prior` (see mllm.prior)
    if D.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
        _record_environment(run_dir / "env.json")
    D.barrier()
    summary_path = run_dir / "run.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.is_file() else {"stages": {}}
    prev_final: Path | None = None
    names = [s.name for s in recipe.stages]
    first = names.index(stages[0].name)
    if first > 0:
        prev_final = run_dir / names[first - 1] / "final"
    corpus = [Path(s.data.json) for s in recipe.stages if s.data.json]
    model_kind = get_model_kind(recipe.model.kind)
    for stage in stages:
        stage_dir = run_dir / stage.name
        final = stage_dir / "final"
        if model_kind.is_saved(final):
            log(f"[{stage.name}] already finished: {final}")
            prev_final = final
            continue
        t0 = time.time()
        if stage.init is not None:
            if stage.init not in names[: names.index(stage.name)]:
                raise ValueError(f"stage {stage.name!r}: init {stage.init!r} is not an earlier stage of the recipe "
                                 f"({names[: names.index(stage.name)]})")
            prev_final = run_dir / stage.init / "final"
        if prev_final is not None:
            if not model_kind.is_saved(prev_final):
                raise FileNotFoundError(f"stage {stage.name!r} starts from {prev_final}, which does not exist")
            model = model_kind.load(prev_final)
        else:
            model = model_kind.build(recipe.model, run_dir, corpus, recipe.engine.seed)
        log(f"[{stage.name}] training {resolve_trainable(stage, model)} on {stage.data.json}")
        result = run_stage(model, recipe, stage, stage_dir, evaluator)
        wall = time.time() - t0
        summary["stages"][stage.name] = {
            "final": str(final), "steps": result.steps, "final_loss": result.final_loss, "wall_s": round(wall, 2),
            "resumed_from": result.resumed_from, "skipped": [s.__dict__ for s in result.skipped],
        }
        summary["final"] = str(final)
        if D.is_main():
            atomic_write_text(summary_path, json.dumps(summary, indent=1))
            if result.skipped:
                log(f"[{stage.name}] skipped {len(result.skipped)} bad sample(s):")
                for s in result.skipped:
                    log(f"  - {s.reason}")
            log(f"[{stage.name}] done: {result.steps} steps, loss {result.final_loss}, {wall:.1f}s -> {final}")
        prev_final = final
        del model
    return summary


def _record_environment(path: Path) -> None:
    """Append this invocation's git revision, versions and hardware to env.json (one entry per (re)start)."""
    from mllm.logging_backends import environment_info

    runs = json.loads(path.read_text()).get("runs", []) if path.is_file() else []
    runs.append(environment_info(D.world_size()))
    atomic_write_text(path, json.dumps({"runs": runs}, indent=1))


def resolve_model_dir(path: str | Path, kind: str = "mllm") -> Path:
    """A model folder of `kind`, or a run folder (its last finished stage's final model)."""
    path = Path(path)
    saved = get_model_kind(kind).is_saved
    if saved(path):
        return path
    run = path / "run.json"
    if run.is_file():
        final = json.loads(run.read_text()).get("final")
        if final and saved(Path(final)):
            return Path(final)
    what = "mllm.json" if kind == "mllm" else f"a saved {kind!r} model"
    raise FileNotFoundError(f"{path}: neither a model folder ({what}) nor a finished run folder (run.json)")
