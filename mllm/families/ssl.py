"""Family `ssl`: a Dinov2-family tower trained by DINO + iBOT self-distillation (encoders.ssl) on images."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from encoders.common import seed_everything, world_size
from encoders.ssl.augment import augmenter_for
from encoders.ssl.config import SSLConfig
from encoders.ssl.model import SSLModel
from encoders.ssl.saving import is_saved
from encoders.towers import build_tower
from mllm.config import ModelConfig, StageConfig
from mllm.data.views import ImageViewsDataset, collate_views
from mllm.data.views_extra import with_objective_fields
from mllm.families.base import Family, StageKind, TaskResult, register_family


def stage_optimizer_steps(stage: StageConfig, n_samples: int) -> int:
    """Optimiser steps the engine will take for `stage` (the same arithmetic as Trainer.total_steps)."""
    if stage.max_steps is not None:
        return int(stage.max_steps)
    per_epoch = -(-n_samples // (stage.batch_size * world_size()))
    return max(1, math.ceil(stage.epochs * per_epoch / stage.grad_accum))


def build_ssl_model(cfg: ModelConfig, run_dir: Path, corpus_files: Sequence[Path], seed: int) -> SSLModel:
    """`model.tower` (type dinov2 / dinov2_registers) + `model.encoder` (SSLConfig)."""
    if cfg.init_from:
        return SSLModel.from_pretrained(cfg.init_from)
    ssl_cfg: SSLConfig = cfg.encoder  # typed and checked when the recipe loaded (mllm.config)
    seed_everything(seed)
    return SSLModel(build_tower(cfg.tower), ssl_cfg)


def ssl_task(model: SSLModel, stage: StageConfig, template: str) -> TaskResult:
    """data.json = any GeoWorld JSONL with an `image` field (captions/scenes); no text."""
    if not stage.data.json:
        raise ValueError(
            f"stage {stage.name!r}: data.json (a JSONL with an 'image' field per line) is not set"
        )
    if not isinstance(model, SSLModel):
        raise ValueError(
            f"stage {stage.name!r} is an ssl stage but the model is a {type(model).__name__}; "
            "set model.kind: ssl"
        )
    ds = ImageViewsDataset(
        stage.data.json,
        stage.data.images,
        augmenter_for(model.image_tower, model.cfg.augment),
        model.image_tower.grid,
        model.cfg.distill,
        stage.data.skip_bad_samples,
    )
    ds = with_objective_fields(ds, model)  # labels, boxes or MLCD's clusters (encoders.ssl.tower_objectives)
    model.configure_schedule(stage.grad_accum, stage_optimizer_steps(stage, len(ds)))
    return model, ds, collate_views


# EMA teachers need ZeRO <= 2.
register_family(
    Family(
        "ssl",
        build_ssl_model,
        SSLModel.from_pretrained,
        lambda p: is_saved(p, "ssl"),
        tasks={"ssl": ssl_task},
        stages=(
            StageKind(
                "ssl",
                {"image_tower": 1.0},
                template="plain",
                task="ssl",
                doc="DINO + iBOT self-distillation of a Dinov2 tower on GeoWorld images (no text), or the "
                "tower objective model.encoder.objective names (swav, supcon, pixpro, mlcd)",
                optional={"distill": 1.0, "objective": 1.0},  # dino's heads | the other objectives'
            ),
        ),
        doc="encoders.ssl.SSLModel: a Dinov2 tower trained by DINO + iBOT self-distillation (images only)",
    )
)
