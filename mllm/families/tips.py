"""Family `tips`: encoders.tips.TipsModel (two CLS tokens, short/long captions, DINO + iBOT) built from a
recipe and trained on captions.jsonl."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from encoders.tips import TipsEncoderConfig, TipsModel, is_tips_dir
from mllm.config import ModelConfig, StageConfig
from mllm.data.views import TipsCollator, TipsDataset
from mllm.families.base import Family, StageKind, TaskResult, register_family
from mllm.families.contrastive import build_contrastive_model
from mllm.families.ssl import stage_optimizer_steps


def build_tips_model(cfg: ModelConfig, run_dir: Path, corpus_files: Sequence[Path], seed: int) -> TipsModel:
    """`model.tower` (dinov2_registers) + `model.encoder` = EncoderConfig + `tips:`."""
    enc: TipsEncoderConfig = cfg.encoder  # typed and checked when the recipe loaded (mllm.config)
    if cfg.init_from and is_tips_dir(cfg.init_from):
        return TipsModel.from_pretrained(cfg.init_from)
    base = build_contrastive_model(
        replace(cfg, kind="contrastive", encoder=enc.pair()), run_dir, corpus_files, seed
    )
    return TipsModel.from_contrastive(base, enc.tips).train()


def tips_task(model: TipsModel, stage: StageConfig, template: str) -> TaskResult:
    """data.json = a GeoWorld captions.jsonl (both captions per image)."""
    if not stage.data.json:
        raise ValueError(f"stage {stage.name!r}: data.json (a GeoWorld captions.jsonl) is not set")
    if not isinstance(model, TipsModel):
        raise ValueError(
            f"stage {stage.name!r} is a TIPS stage but the model is a {type(model).__name__}; "
            "set model.kind: tips"
        )
    ds = TipsDataset(
        stage.data.json, stage.data.images, model.image_tower, model.tips_cfg, stage.data.skip_bad_samples
    )
    model.configure_schedule(stage.grad_accum, stage_optimizer_steps(stage, len(ds)))
    return model, ds, TipsCollator(model.text_tower.tokenize)


register_family(
    Family(
        "tips",
        build_tips_model,
        TipsModel.from_pretrained,
        is_tips_dir,
        tasks={"tips": tips_task},
        stages=(
            StageKind(
                "tips",
                {"image_tower": 1.0, "text_tower": 1.0, "heads": 1.0, "cls2_proj": 1.0, "distill": 1.0},
                template="plain",
                task="tips",
                doc="TIPS: CLS1<->short, CLS2<->long caption + DINO + iBOT (captions.jsonl)",
            ),
        ),
        doc="encoders.tips.TipsModel: two-CLS contrastive (short/long captions) + DINO + iBOT",
    )
)
