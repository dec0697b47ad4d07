"""What a stage trains: the module the engine steps, its dataset and its collator.

A stage kind names a task; most stages train the MultimodalLM on conversations, the tower warm-up
trains the tower under per-patch heads. A new kind of training (contrastive, PRIOR) is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from mllm.config import StageConfig
from mllm.data.conversations import Collator, ConversationDataset
from mllm.model import MultimodalLM

Task = Callable[[MultimodalLM, StageConfig, str], tuple[nn.Module, Dataset, Callable[[list], Any]]]
TASKS: dict[str, Task] = {}


def register_task(name: str) -> Callable[[Task], Task]:
    def deco(fn: Task) -> Task:
        TASKS[name] = fn
        return fn

    return deco


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown training task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


@register_task("conversation")
def conversation_task(model: MultimodalLM, stage: StageConfig, template: str):
    if not stage.data.json:
        raise ValueError(f"stage {stage.name!r}: data.json is not set")
    ds = ConversationDataset(
        stage.data.json, stage.data.images, model.tokenizer, template, model.image_token_id,
        model.num_image_tokens, model.tower.preprocess, model.meta.max_length, stage.data.skip_bad_samples,
    )
    return model, ds, Collator(model.tokenizer.pad_token_id)


@register_task("scene_labels")
def scene_labels_task(model: MultimodalLM, stage: StageConfig, template: str):
    """data.json is a GeoWorld `scenes.jsonl`; only the tower (and throwaway heads) train."""
    from encoders.supervised import PatchSupervision, PatchTargets
    from mllm.data.geoworld.vocab import COLOR_NAMES, SHAPES
    from mllm.data.scene_labels import SceneLabelDataset, collate_scene_labels

    if not stage.data.json:
        raise ValueError(f"stage {stage.name!r}: data.json (a GeoWorld scenes.jsonl) is not set")
    targets = PatchTargets(colours=COLOR_NAMES, shapes=SHAPES)
    ds = SceneLabelDataset(stage.data.json, stage.data.images, targets, model.tower.grid, model.tower.preprocess,
                           stage.data.skip_bad_samples)
    return PatchSupervision(model.tower, targets), ds, collate_scene_labels
