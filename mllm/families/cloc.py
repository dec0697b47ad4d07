"""Family `cloc`: encoders.cloc.ClocModel (a CLIP pair + Prompter) built from a recipe and trained on
captions.jsonl joined with regions.jsonl."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from encoders.cloc import ClocEncoderConfig, ClocModel, is_cloc_dir
from mllm.config import ModelConfig, StageConfig
from mllm.data.regions import RegionCaptionCollator, RegionCaptionDataset
from mllm.families.base import Family, StageKind, TaskResult, register_family
from mllm.families.contrastive import build_contrastive_model


def build_cloc_model(cfg: ModelConfig, run_dir: Path, corpus_files: Sequence[Path], seed: int) -> ClocModel:
    """`model.encoder` = EncoderConfig + `cloc:` (ClocConfig).

    `model.init_from` may name a CLOC folder (continue) or a contrastive one (a CLIP start: fresh Prompter).
    """
    enc: ClocEncoderConfig = cfg.encoder  # typed and checked when the recipe loaded (mllm.config)
    if cfg.init_from and is_cloc_dir(cfg.init_from):
        return ClocModel.from_pretrained(cfg.init_from)
    base = build_contrastive_model(
        replace(cfg, kind="contrastive", encoder=enc.pair()), run_dir, corpus_files, seed
    )
    return ClocModel.from_contrastive(base, enc.cloc).train()


def cloc_task(model: ClocModel, stage: StageConfig, template: str) -> TaskResult:
    """data.json = captions.jsonl; its regions.jsonl sibling (ClocConfig.regions_file)."""
    if not stage.data.json:
        raise ValueError(f"stage {stage.name!r}: data.json (a GeoWorld captions.jsonl) is not set")
    if not isinstance(model, ClocModel):
        raise ValueError(
            f"stage {stage.name!r} is a CLOC stage but the model is a {type(model).__name__}; "
            "set model.kind: cloc"
        )
    regions = Path(stage.data.json).parent / model.cloc_cfg.regions_file
    ds = RegionCaptionDataset(
        stage.data.json,
        regions,
        stage.data.images,
        model.image_tower.preprocess,
        stage.data.caption,
        model.cloc_cfg.regions_per_image,
        stage.data.skip_bad_samples,
    )
    return model, ds, RegionCaptionCollator(model.text_tower.tokenize)


register_family(
    Family(
        "cloc",
        build_cloc_model,
        ClocModel.from_pretrained,
        is_cloc_dir,
        tasks={"cloc": cloc_task},
        stages=(
            StageKind(
                "cloc",
                {"image_tower": 1.0, "text_tower": 1.0, "heads": 1.0, "prompter": 1.0},
                template="plain",
                task="cloc",
                doc="CLOC: CLIP + region-text InfoNCE + grounding (captions.jsonl + regions.jsonl)",
            ),
        ),
        doc="encoders.cloc.ClocModel: CLIP pair + Prompter (region-text InfoNCE + grounding)",
    )
)
