"""Family `contrastive`: an `encoders.ContrastiveModel` built from a recipe (towers, heads, tokenizer) and
trained on image-caption pairs by one of `encoders.objectives` (the recipe's `model.encoder.objective`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from encoders.coca import CocaModel, is_coca_dir
from encoders.common import is_main, seed_everything
from encoders.contrastive import META_FILE, ContrastiveModel, encoder_config
from encoders.text_tower import build_text_tower
from encoders.towers import build_tower
from mllm.config import ModelConfig, StageConfig
from mllm.data.captions import CaptionCollator, CaptionDataset
from mllm.data.corpus import caption_corpus
from mllm.families.base import Family, StageKind, TaskResult, register_family
from mllm.tokenizer import load_tokenizer, train_tokenizer


def build_contrastive_model(
    cfg: ModelConfig, run_dir: Path, corpus_files: Sequence[Path], seed: int
) -> ContrastiveModel:
    """A fresh ContrastiveModel from a recipe's `ModelConfig` (kind "contrastive").

    `cfg.tower` is the image tower, `cfg.encoder` the rest (EncoderConfig). The tokenizer is
    `cfg.tokenizer.path`, else a tokenizer saved beside `text.path`, else one trained here on the
    recipe's captions (saved to RUN/tokenizer, so every stage and rank uses the same one).
    """
    if cfg.init_from:
        model = load_contrastive_model(cfg.init_from)
        coca = getattr(cfg.encoder, "coca", None)
        if coca is not None and not isinstance(model, CocaModel):  # CoCa on a trained pair: fresh decoder
            return CocaModel(model.image_tower, model.text_tower, replace(model.cfg, coca=coca), model.heads)
        return model
    enc = encoder_config(cfg.encoder)
    seed_everything(seed)
    tok_dir = Path(run_dir) / "tokenizer"
    if cfg.tokenizer.path:
        tok = load_tokenizer(cfg.tokenizer.path)
    elif enc.text.path and (Path(enc.text.path) / "tokenizer_config.json").is_file():
        tok = load_tokenizer(enc.text.path)
    elif tok_dir.is_dir():
        tok = load_tokenizer(tok_dir)
    else:
        texts = caption_corpus(list(corpus_files))
        if not texts:
            raise ValueError(
                f"no caption text in {[str(p) for p in corpus_files]} to train a tokenizer on; "
                "set model.tokenizer.path"
            )
        tok = train_tokenizer(texts, cfg.tokenizer.vocab_size)
        if is_main():
            tok.save_pretrained(str(tok_dir))
    image_tower = build_tower(cfg.tower)
    text_tower = build_text_tower(enc.text, tok)
    # `model.encoder.coca`: the same pair with CoCa's poolers and captioning decoder (encoders.coca)
    return (CocaModel if enc.coca is not None else ContrastiveModel)(image_tower, text_tower, enc)


def load_contrastive_model(path: str | Path) -> ContrastiveModel:
    """A saved contrastive pair, as the CocaModel it is when its encoder has a coca section."""
    return CocaModel.from_pretrained(path) if is_coca_dir(path) else ContrastiveModel.from_pretrained(path)


def contrastive_task(model: ContrastiveModel, stage: StageConfig, template: str) -> TaskResult:
    """A ContrastiveModel on image-caption pairs (GeoWorld captions.jsonl); hard negatives when the
    objective asks for them (NegCLIP), and hard images with their captions when it also sets
    `hard_images` (NegCLIP's default: its 2B-image, 4B-text batch)."""
    if not stage.data.json:
        raise ValueError(f"stage {stage.name!r}: data.json (a GeoWorld captions.jsonl) is not set")
    if not hasattr(model, "encode_text"):
        raise ValueError(
            f"stage {stage.name!r} is contrastive but the model is a {type(model).__name__}; "
            "set model.kind: contrastive"
        )
    ds = CaptionDataset(
        stage.data.json,
        stage.data.images,
        model.image_tower.preprocess,
        stage.data.caption,
        hard_negatives="hard_txt" in model.needs,
        skip_bad_samples=stage.data.skip_bad_samples,
        hard_images="hard_txt" in model.needs and bool(getattr(model.objective, "hard_images", False)),
        image_augment=stage.data.image_augment,
        sub_captions=stage.data.sub_captions,
        synthetic="syn_txt" in model.needs,  # ALIP's second path
    )
    return model, ds, CaptionCollator(model.text_tower.tokenize, text_mask=stage.data.text_mask)


register_family(
    Family(
        "contrastive",
        build_contrastive_model,
        load_contrastive_model,
        lambda p: (Path(p) / META_FILE).is_file(),
        tasks={"contrastive": contrastive_task},
        stages=(
            StageKind(
                "contrastive",
                {"image_tower": 1.0, "text_tower": 1.0, "heads": 1.0},
                template="plain",
                task="contrastive",
                doc="image + text towers + heads on GeoWorld captions.jsonl (data.caption picks which)",
                optional={"coca": 1.0},  # CoCa's poolers and decoders (model.encoder.coca)
            ),
        ),
        doc="encoders.ContrastiveModel: image tower + text tower + heads, trained by encoders.objectives",
    )
)
