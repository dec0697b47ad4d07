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


def _caption_dataset(model: MultimodalLM, stage: StageConfig, template: str) -> ConversationDataset:
    if not stage.data.json:
        raise ValueError(f"stage {stage.name!r}: data.json (captions, LLaVA format) is not set")
    return ConversationDataset(
        stage.data.json, stage.data.images, model.tokenizer, template, model.image_token_id,
        model.num_image_tokens, model.tower.preprocess, model.meta.max_length, stage.data.skip_bad_samples,
    )


@register_task("prior_ref")
def prior_ref_task(model: MultimodalLM, stage: StageConfig, template: str):
    """PRIOR's reference LM: the model's `lm` on each caption alone (`[BOS] + caption`; no image, no prompt)."""
    from mllm.prior import CaptionTextDataset

    return model, CaptionTextDataset(_caption_dataset(model, stage, template)), Collator(model.tokenizer.pad_token_id)


@register_task("prior")
def prior_task(model: MultimodalLM, stage: StageConfig, template: str):
    """Captions with PRIOR token weights (see mllm.prior for the settings and the cache)."""
    from pathlib import Path

    from mllm import prior as P
    from mllm.training import distributed as D

    ds = _caption_dataset(model, stage, template)
    settings, source = P.resolve_settings(stage.name, stage.data.json)
    ref = P.reference_from(model.lm, settings, len(model.tokenizer))
    fp = P.fingerprint(model.tokenizer, ref, settings, template)
    data = Path(stage.data.json)
    cache_dir = Path(settings.cache) if settings.cache else data.parent / "prior_cache" / f"{data.stem}-{P.digest(fp)[:16]}"
    if P.cache_exists(cache_dir):
        P.check_fingerprint(cache_dir, fp)  # every rank refuses a stale cache, none waits on rank 0 for it
    elif D.is_main():
        print(f"[{stage.name}] PRIOR weights (settings from {source}: alpha={settings.alpha}, "
              f"floor={settings.floor}, cap={settings.cap}, ref={settings.ref or 'the model lm'}) -> {cache_dir}")
        P.save_cache(cache_dir, P.compute_weights(ref.to(D.device()), ds, settings), fp)
    D.barrier()
    del ref
    return model, P.PriorDataset(ds, P.WeightCache(cache_dir, fp)), Collator(model.tokenizer.pad_token_id)
