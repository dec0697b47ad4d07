"""The family registry: one `register_family(Family(...))` per model family says how to build a model of
that family from a recipe, how to load a saved one and recognise its folder, which training tasks it
brings and which stage kinds (recipe `stages[].kind`) train it.

Training (`mllm.training.runner`) builds and trains through it, evaluation and `mllm.load_model` load
through it (`mllm.loading`), and neither learns what a model is. Stage-kind and task names are global:
a family that reuses a name another family registered is refused, naming both registrations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from torch import nn
from torch.utils.data import Dataset

from encoders.registry import Registry
from mllm.config import ModelConfig, StageConfig
from mllm.data.batch import Batch

__all__ = [
    "FAMILIES",
    "STAGE_KINDS",
    "TASKS",
    "BuildFn",
    "Collate",
    "Family",
    "StageKind",
    "Task",
    "TaskResult",
    "get_family",
    "get_stage_kind",
    "get_task",
    "register_family",
    "resolve_template",
    "resolve_trainable",
    "saved_family",
]

# build(cfg, run_dir, corpus_files, seed): a fresh model (or cfg.init_from loaded); corpus_files are the
# recipe's data files, from which a tokenizer is trained when the recipe names none.
BuildFn = Callable[[ModelConfig, Path, list[Path], int], nn.Module]
#: A collator: dataset items -> one micro-batch (the contract of mllm.data.batch).
Collate = Callable[[list[dict[str, Any]]], Batch]
#: What a task gives the engine: the module it steps (the model, or a wrapper that trains part of it, e.g.
#: the tower warm-up's PatchSupervision), the stage's dataset and its collator.
TaskResult = tuple[nn.Module, Dataset, Collate]

ModelT = TypeVar("ModelT", bound=nn.Module, contravariant=True)


class Task(Protocol[ModelT]):
    """A training task: task(model, stage, template) -> TaskResult.

    A task receives the model of the family that brings it, so each task states its own model type:
    `Task[MultimodalLM]` for the `mllm` family's tasks, `Task[ContrastiveModel]` for `contrastive`,
    `Task[SSLModel]`, `Task[TipsModel]`, `Task[ClocModel]`. The registry holds `Task[Any]`: the runner
    passes each stage the model its family built, and a stage kind names a task of that family (or of
    one whose model it is, as TIPS and CLOC models are contrastive models)."""

    def __call__(self, model: ModelT, stage: StageConfig, template: str, /) -> TaskResult: ...


@dataclass(frozen=True)
class StageKind:
    """Which modules a stage trains, with which learning-rate multiplier, on which task and template.

    A recipe's stage may override `trainable` (module prefix -> learning rate) to train something else,
    e.g. the tower during `instruct` in the CPU demo, without a line of code."""

    name: str
    # module prefix -> learning-rate multiplier of the stage's `lr`
    trainable: dict[str, float] = field(default_factory=dict)
    template: str | None = None  # None: the model's template
    task: str = "conversation"  # key of TASKS: what module and data the stage trains
    doc: str = ""
    # Like `trainable`, for modules only some models have (a fused model's `router`): trained when present.
    optional: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """A model family: the value of a recipe's `model.kind`."""

    name: str
    build: BuildFn
    load: Callable[[Path], nn.Module]  # load(dir): a model saved by this family's save_pretrained
    is_saved: Callable[[Path], bool]  # is_saved(dir): dir holds a complete save of this family
    tasks: Mapping[str, Task[Any]] = field(default_factory=dict)  # the training tasks it brings, by name
    stages: tuple[StageKind, ...] = ()  # the stage kinds it brings (their task: its own or a registered one)
    doc: str = ""


FAMILIES: Registry[Family] = Registry("model kind")
TASKS: Registry[Task[Any]] = Registry("training task")
STAGE_KINDS: Registry[StageKind] = Registry("stage kind")


def register_family(family: Family) -> Family:
    """Register `family`, its tasks and its stage kinds, all or none (a taken name refuses the lot)."""
    FAMILIES.check_free(family.name, stacklevel=2)
    for name in family.tasks:
        TASKS.check_free(name, stacklevel=2)
    for kind in family.stages:
        STAGE_KINDS.check_free(kind.name, stacklevel=2)
        if kind.task not in family.tasks and kind.task not in TASKS:
            raise ValueError(
                f"family {family.name!r}: stage kind {kind.name!r} names task {kind.task!r}, which "
                f"neither this family nor a registered one brings (known: {TASKS.known()})"
            )
    for name, task in family.tasks.items():
        TASKS.register(name, task, stacklevel=2)
    for kind in family.stages:
        STAGE_KINDS.register(kind.name, kind, stacklevel=2)
    return FAMILIES.register(family.name, family, stacklevel=2)


def get_family(name: str) -> Family:
    return FAMILIES[name]


def saved_family(path: str | Path) -> Family | None:
    """The family whose complete save `path` holds, or None."""
    path = Path(path)
    return next((f for f in FAMILIES.values() if f.is_saved(path)), None)


def get_task(name: str) -> Task[Any]:
    return TASKS[name]


def get_stage_kind(name: str) -> StageKind:
    return STAGE_KINDS[name]


def resolve_trainable(stage: StageConfig, model: nn.Module | None = None) -> dict[str, float]:
    """Module prefix -> absolute learning rate for this stage (`model`: to resolve the kind's optional ones)."""
    if stage.trainable is not None:
        return dict(stage.trainable)
    kind = get_stage_kind(stage.kind)
    present = {name for name, _ in model.named_children()} if model is not None else set()
    optional = {k: v for k, v in kind.optional.items() if k in present}
    return {prefix: stage.lr * mult for prefix, mult in {**kind.trainable, **optional}.items()}


def resolve_template(stage: StageConfig, model_template: str) -> str:
    if stage.data.template:
        return stage.data.template
    return get_stage_kind(stage.kind).template or model_template
