"""What a stage trains: the module the engine steps, its dataset and its collator.

A stage kind names a task; most stages train the MultimodalLM on conversations, the tower warm-up
trains the tower under per-patch heads. A new kind of training (contrastive, PRIOR) is one entry here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from mllm.config import StageConfig
from mllm.data.conversations import Collator, ConversationDataset
from mllm.data.geoworld.live import LiveWorldDataset
from mllm.model import MultimodalLM
from mllm.training.stages import resolve_trainable

log = logging.getLogger(__name__)

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
    if stage.data.live is not None:
        if stage.data.json:
            raise ValueError(f"stage {stage.name!r}: data.json and data.live are both set; choose one")
        if stage.data.live.curriculum and stage.data.sampler != "sequential":
            raise ValueError(f"stage {stage.name!r}: data.live.curriculum={stage.data.live.curriculum} needs "
                             f"data.sampler: sequential (got {stage.data.sampler!r}), else the order is shuffled")
        live = LiveWorldDataset(stage.data.live, model.tokenizer, template, model.image_token_id,
                                model.num_image_tokens, model.preprocess, model.meta.max_length,
                                model.meta.image_placement)
        _anchor_projector(model, stage)
        return model, live, _speed_switches(model, stage, None)
    if not stage.data.json:
        raise ValueError(f"stage {stage.name!r}: data.json (or data.live) is not set")
    ds = ConversationDataset(
        stage.data.json, stage.data.images, model.tokenizer, template, model.image_token_id,
        model.num_image_tokens, model.preprocess, model.meta.max_length, stage.data.skip_bad_samples,
    )
    _anchor_projector(model, stage)
    return model, ds, _speed_switches(model, stage, ds)


def _anchor_projector(model: MultimodalLM, stage: StageConfig) -> None:
    """An anchored projector (mllm.projectors.AnchoredProjector) takes its word anchors from the LM at
    the first conversation stage that trains the projector: by then `lm_pretrain` (which does not) has
    taught the LM its words."""
    anchor = getattr(model.projector, "anchor", None)
    if anchor is not None and any(k.split(".")[0] == "projector" for k in resolve_trainable(stage, model)):
        n = anchor(model.lm.get_input_embeddings(), model.tokenizer)
        if n:
            log.info("stage %s: projector anchors set from the LM's embeddings of %d words", stage.name, n)


def _speed_switches(model: MultimodalLM, stage: StageConfig, ds: ConversationDataset | None) -> Collator:
    """The stage's performance switches (docs/performance.md): the frozen-tower feature cache on `ds`,
    gradient checkpointing and torch.compile on the model; returns the (packing) collator."""
    if stage.data.feature_cache and ds is not None:
        from mllm.feature_cache import cache_for_stage

        cache_for_stage(model, ds, stage, resolve_trainable(stage))
    if stage.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if stage.compile:
        # In place (nn.Module.compile), so parameter names, checkpoints and DeepSpeed see the same model.
        for layer in model.lm.get_decoder().layers:
            layer.compile(dynamic=True)
    pack = (stage.data.pack_length or model.meta.max_length) if stage.data.packing else None
    return Collator(model.tokenizer.pad_token_id, pack_length=pack)


@register_task("scene_labels")
def scene_labels_task(model: MultimodalLM, stage: StageConfig, template: str):
    """data.json is a GeoWorld `scenes.jsonl`; only the tower (and throwaway heads) train."""
    from encoders.supervised import PatchSupervision, PatchTargets
    from mllm.data.geoworld.vocab import COLOR_NAMES, SHAPES
    from mllm.data.scene_labels import SceneLabelDataset, collate_scene_labels

    if not stage.data.json:
        raise ValueError(f"stage {stage.name!r}: data.json (a GeoWorld scenes.jsonl) is not set")
    # The centre head exists where the projector reads it (an anchored projector's "object" word).
    targets = PatchTargets(colours=COLOR_NAMES, shapes=SHAPES, centre="centre" in getattr(model.projector, "words", {}))
    ds = SceneLabelDataset(stage.data.json, stage.data.images, targets, model.tower.grid, model.tower.preprocess,
                           stage.data.skip_bad_samples)
    readout = None
    if stage.readout_heads:
        first = model.projector[0] if isinstance(model.projector, nn.Sequential) else model.projector
        first = getattr(first, "heads", first)  # an AnchoredProjector's heads are its readout
        if not isinstance(first, nn.Linear):
            raise ValueError(f"stage {stage.name!r}: readout_heads needs a projector that starts with a Linear, "
                             f"got {type(model.projector).__name__}")
        readout = first
    return PatchSupervision(model.tower, targets, readout), ds, collate_scene_labels


def _caption_dataset(model: MultimodalLM, stage: StageConfig, template: str) -> ConversationDataset:
    if not stage.data.json:
        raise ValueError(f"stage {stage.name!r}: data.json (captions, LLaVA format) is not set")
    return ConversationDataset(
        stage.data.json, stage.data.images, model.tokenizer, template, model.image_token_id,
        model.num_image_tokens, model.preprocess, model.meta.max_length, stage.data.skip_bad_samples,
    )


@register_task("prior_ref")
def prior_ref_task(model: MultimodalLM, stage: StageConfig, template: str):
    """PRIOR's reference LM: the model's `lm` on each caption alone (`[BOS] + caption`; no image, no prompt)."""
    from mllm.prior import CaptionTextDataset

    return model, CaptionTextDataset(_caption_dataset(model, stage, template)), _speed_switches(model, stage, None)


@register_task("prior")
def prior_task(model: MultimodalLM, stage: StageConfig, template: str):
    """Captions with PRIOR token weights (see mllm.prior for the settings and the cache)."""
    from pathlib import Path

    from mllm import prior as P
    from mllm.training import distributed as D

    ds = _caption_dataset(model, stage, template)
    collate = _speed_switches(model, stage, ds)
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
    return model, P.PriorDataset(ds, P.WeightCache(cache_dir, fp)), collate


@register_task("contrastive")
def contrastive_task(model, stage: StageConfig, template: str):
    """A ContrastiveModel on image-caption pairs (GeoWorld captions.jsonl); hard negatives when the
    objective asks for them (NegCLIP)."""
    from mllm.data.captions import CaptionCollator, CaptionDataset

    if not stage.data.json:
        raise ValueError(f"stage {stage.name!r}: data.json (a GeoWorld captions.jsonl) is not set")
    if not hasattr(model, "encode_text"):
        raise ValueError(f"stage {stage.name!r} is contrastive but the model is a {type(model).__name__}; "
                         "set model.kind: contrastive")
    ds = CaptionDataset(stage.data.json, stage.data.images, model.image_tower.preprocess, stage.data.caption,
                        hard_negatives="hard_txt" in model.needs, skip_bad_samples=stage.data.skip_bad_samples)
    return model, ds, CaptionCollator(model.text_tower.tokenize)


@register_task("geoglip")
def geoglip_task(model: MultimodalLM, stage: StageConfig, template: str):
    """data.json is a GeoWorld `scenes.jsonl`; only the fused model's geometric encoder (`geo`) trains."""
    from encoders.geo import GeoDetector
    from mllm.data.geoworld.geo_targets import GeoFigureDataset, collate_geo

    if not stage.data.json:
        raise ValueError(f"stage {stage.name!r}: data.json (a GeoWorld scenes.jsonl) is not set")
    geo = getattr(model, "geo", None)
    if geo is None:
        raise ValueError(f"stage {stage.name!r} trains a geometric encoder but the model has none; "
                         "set model.fusion: {type: router, geo: {...}}")
    ds = GeoFigureDataset(stage.data.json, stage.data.images, geo.config.image_size, geo.preprocess,
                          geo.config.classes)
    return GeoDetector(geo), ds, collate_geo


# encoders.ssl / tips / cloc: each module owns its dataset and collator; these entries only route to them.
@register_task("ssl")
def ssl_task(model, stage: StageConfig, template: str):
    from encoders.ssl import ssl_task as task

    return task(model, stage, template)


@register_task("tips")
def tips_task(model, stage: StageConfig, template: str):
    from encoders.tips import tips_task as task

    return task(model, stage, template)


@register_task("cloc")
def cloc_task(model, stage: StageConfig, template: str):
    from encoders.cloc import cloc_task as task

    return task(model, stage, template)
