"""Families `albef` and `degla`: contrastive pairs with an EMA copy (encoders.albef.AlbefModel: fusion encoder,
ITM, MLM, momentum distillation; encoders.degla.DeglaModel: self-distillation from an EMA teacher and
image-/text-grounded contrast with generated negatives). Both save as contrastive pair folders, so the
contrastive family's loaders and evaluations read their towers.

`model.init_from` may name a folder of the same kind (continue) or any contrastive pair folder (start from a
trained CLIP: the EMA copy starts as that model, as DeGLA fine-tunes a pre-trained CLIP)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from encoders.albef import AlbefEncoderConfig, AlbefModel, is_albef_dir
from encoders.degla import DeglaEncoderConfig, DeglaModel, is_degla_dir
from mllm.config import ModelConfig, StageConfig
from mllm.data.captions import CaptionCollator, CaptionDataset
from mllm.data.negatives import NegativesCaptionCollator, NegativesCaptionDataset
from mllm.families.base import Family, StageKind, TaskResult, register_family
from mllm.families.contrastive import build_contrastive_model

PAIR = {"image_tower": 1.0, "text_tower": 1.0, "heads": 1.0}


def build_albef_model(cfg: ModelConfig, run_dir: Path, corpus_files: Sequence[Path], seed: int) -> AlbefModel:
    """`model.tower` + `model.encoder` = EncoderConfig + `albef:` (AlbefConfig)."""
    enc: AlbefEncoderConfig = cfg.encoder  # typed and checked when the recipe loaded (mllm.config)
    if cfg.init_from and is_albef_dir(cfg.init_from):
        return AlbefModel.from_pretrained(cfg.init_from).train()
    base = build_contrastive_model(
        replace(cfg, kind="contrastive", encoder=enc.pair()), run_dir, corpus_files, seed
    )
    return AlbefModel.from_contrastive(base, enc.albef).train()


def build_degla_model(cfg: ModelConfig, run_dir: Path, corpus_files: Sequence[Path], seed: int) -> DeglaModel:
    """`model.tower` + `model.encoder` = EncoderConfig + `degla:` (DeglaConfig)."""
    enc: DeglaEncoderConfig = cfg.encoder
    if cfg.init_from and is_degla_dir(cfg.init_from):
        return DeglaModel.from_pretrained(cfg.init_from).train()
    base = build_contrastive_model(
        replace(cfg, kind="contrastive", encoder=enc.pair()), run_dir, corpus_files, seed
    )
    return DeglaModel.from_contrastive(base, enc.degla).train()


def _check(model: object, cls: type, stage: StageConfig, kind: str) -> None:
    if not stage.data.json:
        raise ValueError(f"stage {stage.name!r}: data.json (a GeoWorld captions.jsonl) is not set")
    if not isinstance(model, cls):
        raise ValueError(
            f"stage {stage.name!r} is a {kind} stage but the model is a {type(model).__name__}; "
            f"set model.kind: {kind}"
        )


def albef_task(model: AlbefModel, stage: StageConfig, template: str) -> TaskResult:
    """Image-caption pairs (GeoWorld captions.jsonl, `data.caption`); ITM negatives come from the batch."""
    _check(model, AlbefModel, stage, "albef")
    ds = CaptionDataset(
        stage.data.json,
        stage.data.images,
        model.image_tower.preprocess,
        stage.data.caption,
        skip_bad_samples=stage.data.skip_bad_samples,
    )
    return model, ds, CaptionCollator(model.text_tower.tokenize)


def degla_task(model: DeglaModel, stage: StageConfig, template: str) -> TaskResult:
    """Image-caption pairs with `n_negatives` of GeoWorld's negative captions per image."""
    _check(model, DeglaModel, stage, "degla")
    ds = NegativesCaptionDataset(
        stage.data.json,
        stage.data.images,
        model.image_tower.preprocess,
        stage.data.caption,
        model.degla_cfg.n_negatives,
        stage.data.skip_bad_samples,
    )
    return model, ds, NegativesCaptionCollator(model.text_tower.tokenize)


register_family(
    Family(
        "albef",
        build_albef_model,
        AlbefModel.from_pretrained,
        is_albef_dir,
        tasks={"albef": albef_task},
        stages=(
            StageKind(
                "albef",
                {**PAIR, "albef": 1.0},
                template="plain",
                task="albef",
                doc="ALBEF: ITC (momentum-distilled) + ITM (hard negatives) + MLM over a fusion encoder",
            ),
        ),
        doc="encoders.albef.AlbefModel: contrastive pair + fusion encoder, ITM, MLM, EMA momentum model",
    )
)

register_family(
    Family(
        "degla",
        build_degla_model,
        DeglaModel.from_pretrained,
        is_degla_dir,
        tasks={"degla": degla_task},
        stages=(
            StageKind(
                "degla",
                dict(PAIR),
                template="plain",
                task="degla",
                doc="DeGLA: global contrast + EMA self-distillation + IGC/TGC on GeoWorld's negative captions",
            ),
        ),
        doc="encoders.degla.DeglaModel: contrastive pair + EMA teacher (self-distillation), IGC + TGC",
    )
)
