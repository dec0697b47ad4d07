"""Family `mllm`: a MultimodalLM (tower + projector + causal LM, mllm.model) built from a recipe (tokenizer
given or trained here), its training tasks (conversations, the tower warm-up, PRIOR, GeoGLIP) and the
stage kinds of the LLaVA-style pipeline."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from torch import nn

from encoders.common import barrier, device, is_main, seed_everything
from encoders.geo import GeoDetector
from encoders.supervised import PatchSupervision, PatchTargets
from mllm import prior as P
from mllm.cgvlm import with_cgvlm
from mllm.config import ConfigError, ModelConfig, StageConfig, from_dict
from mllm.data.conversations import Collator, ConversationDataset
from mllm.data.corpus import corpus_from_records
from mllm.data.geoworld.augment import AugmentConfig
from mllm.data.geoworld.geo_targets import GeoFigureDataset, collate_geo
from mllm.data.geoworld.live import LiveWorldDataset
from mllm.data.geoworld.vocab import COLOR_NAMES, SHAPES
from mllm.data.memo import MemoDataset
from mllm.data.scene_labels import SceneLabelDataset, collate_scene_labels
from mllm.families.base import Family, StageKind, TaskResult, register_family, resolve_trainable
from mllm.feature_cache import cache_for_stage
from mllm.hf_import import resolve_model_path
from mllm.model import MultimodalLM, build_lm
from mllm.readout import LOOK_TOKEN, look_at
from mllm.tokenizer import ensure_image_token, ensure_look_token, load_tokenizer, train_tokenizer

log = logging.getLogger(__name__)


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
            if is_main():
                tok.save_pretrained(str(tok_dir))
    ensure_image_token(tok, cfg.tokenizer.image_token)
    if cfg.readout is not None:
        ensure_look_token(tok, LOOK_TOKEN)
    lm = build_lm(
        cfg.lm.path,
        cfg.lm.config,
        len(tok),
        cfg.lm.attn_implementation,
        cfg.lm.trust_remote_code,
        cfg.lm.init,
    )
    return MultimodalLM.build(
        cfg.tower,
        cfg.projector,
        lm,
        tok,
        cfg.tokenizer.image_token,
        cfg.template,
        cfg.max_length,
        box_format=cfg.box_format,
        fusion=cfg.fusion,
        image_placement=cfg.image_placement,
        readout=cfg.readout,
    )


def _local_paths(cfg: ModelConfig) -> ModelConfig:
    """Tower/LM/tokenizer paths as local folders; a hub name is fetched only with `allow_network`."""

    def local(path: str | None, what: str) -> str | None:
        return resolve_model_path(path, cfg.allow_network, what) if path else path

    return dataclasses.replace(
        cfg,
        tower=dataclasses.replace(cfg.tower, path=local(cfg.tower.path, "model.tower.path")),
        lm=dataclasses.replace(cfg.lm, path=local(cfg.lm.path, "model.lm.path")),
        tokenizer=dataclasses.replace(cfg.tokenizer, path=local(cfg.tokenizer.path, "model.tokenizer.path")),
    )


def _build_mllm(cfg: ModelConfig, run_dir: Path, corpus_files: list[Path], seed: int) -> MultimodalLM:
    if cfg.encoder:  # a MultimodalLM has no use for it: refuse rather than ignore a misplaced section
        raise ConfigError(
            f"model.encoder {sorted(cfg.encoder)} is set but model.kind is 'mllm'; "
            "did you mean model.kind: contrastive?"
        )
    return build_model(cfg, run_dir, corpus_files, seed)


def conversation_task(model: MultimodalLM, stage: StageConfig, template: str) -> TaskResult:
    if stage.data.live is not None:
        if stage.data.json:
            raise ValueError(f"stage {stage.name!r}: data.json and data.live are both set; choose one")
        if stage.data.live.curriculum and stage.data.sampler != "sequential":
            raise ValueError(
                f"stage {stage.name!r}: data.live.curriculum={stage.data.live.curriculum} needs "
                f"data.sampler: sequential (got {stage.data.sampler!r}), else the order is shuffled"
            )
        live = LiveWorldDataset(
            stage.data.live,
            model.tokenizer,
            template,
            model.image_token_id,
            model.num_image_tokens,
            model.preprocess,
            model.meta.max_length,
            model.meta.image_placement,
        )
        live.look_token = model.meta.look_token
        live.look_at = look_at(model.meta.readout)
        if model.readout is not None and (
            getattr(model.readout, "ground", 0) > 0 or getattr(model.readout, "count", 0) > 0
        ):
            live.look_grid = model.tower.grid  # the looks learn where to attend from the scene graphs too
        _anchor_projector(model, stage)
        return with_cgvlm(model, stage.cgvlm), live, _speed_switches(model, stage, None)
    ds = _json_dataset(model, stage, template, "data.json (or data.live)")
    _anchor_projector(model, stage)
    return with_cgvlm(model, stage.cgvlm), ds, _speed_switches(model, stage, ds)


def _anchor_projector(model: MultimodalLM, stage: StageConfig) -> None:
    """An anchored projector (mllm.projectors.AnchoredProjector) takes its word anchors from the LM at
    the first conversation stage that trains the projector: by then `lm_pretrain` (which does not) has
    taught the LM its words. A readout's where words are tied at the same stage, whatever the projector."""
    if not any(k.split(".")[0] == "projector" for k in resolve_trainable(stage, model)):
        return
    embedding = model.lm.get_input_embeddings()
    anchor = getattr(model.grid_projector, "anchor", None)  # interleaved MoF: the first stream's
    if anchor is not None:
        n = anchor(embedding, model.tokenizer)
        if n:
            log.info("stage %s: projector anchors set from the LM's embeddings of %d words", stage.name, n)
        # a counting readout's selector starts from the same words (mllm.readout.FocusReadout.anchor_count)
        anchor_count = getattr(model.readout, "anchor_count", None)
        if anchor_count is not None:
            n = anchor_count(model.grid_projector.count_names, model.tokenizer)
            if n:
                log.info("stage %s: the counter's selector starts from %d words", stage.name, n)
    anchor_where = getattr(model.readout, "anchor_where", None)  # mllm.readout.FocusReadout.where_words
    if anchor_where is not None and anchor_where(embedding, model.tokenizer):
        log.info("stage %s: the readout's where words tied to the LM's embeddings", stage.name)


def _speed_switches(model: MultimodalLM, stage: StageConfig, ds: ConversationDataset | None) -> Collator:
    """The stage's performance switches (docs/performance.md): the frozen-tower feature cache on `ds`,
    gradient checkpointing and torch.compile on the model; returns the (packing) collator."""
    if stage.data.feature_cache and ds is not None:
        cache_for_stage(model, ds, stage, resolve_trainable(stage))
    if stage.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if stage.compile:
        # In place (nn.Module.compile), so parameter names, checkpoints and DeepSpeed see the same model.
        for layer in model.lm.get_decoder().layers:
            layer.compile(dynamic=True)
    pack = (stage.data.pack_length or model.meta.max_length) if stage.data.packing else None
    return Collator(model.tokenizer.pad_token_id, pack_length=pack)


def scene_labels_task(model: MultimodalLM, stage: StageConfig, template: str) -> TaskResult:
    """data.json is a GeoWorld `scenes.jsonl`; only the tower (and throwaway heads) train."""
    if not stage.data.json:
        raise ValueError(f"stage {stage.name!r}: data.json (a GeoWorld scenes.jsonl) is not set")
    # The density head exists where the projector reads it (an anchored projector's "object" word).
    targets = PatchTargets(
        colours=COLOR_NAMES, shapes=SHAPES, density="density" in getattr(model.grid_projector, "words", {})
    )
    ds = SceneLabelDataset(
        stage.data.json,
        stage.data.images,
        targets,
        model.tower.grid,
        model.tower.preprocess,
        stage.data.skip_bad_samples,
        augment=(
            from_dict(AugmentConfig, stage.data.scene_augment, "data.scene_augment")
            if stage.data.scene_augment is not None
            else None
        ),
    )
    readout = None
    if stage.readout_heads:
        proj = model.grid_projector  # interleaved MoF: the first stream's, the one the readout reads
        first = proj[0] if isinstance(proj, nn.Sequential) else proj
        first = getattr(first, "heads", first)  # an AnchoredProjector's heads are its readout
        if not isinstance(first, nn.Linear):
            raise ValueError(
                f"stage {stage.name!r}: readout_heads needs a projector that starts with a Linear, "
                f"got {type(proj).__name__}"
            )
        readout = first
    return (
        PatchSupervision(model.tower, targets, readout),
        MemoDataset(ds) if stage.data.cache_samples else ds,
        collate_scene_labels,
    )


def _json_dataset(model: MultimodalLM, stage: StageConfig, template: str, what: str) -> ConversationDataset:
    """The stage's LLaVA-format file as a dataset; `what` names the setting in the error when it is missing."""
    if not stage.data.json:
        raise ValueError(f"stage {stage.name!r}: {what} is not set")
    ds = ConversationDataset(
        stage.data.json,
        stage.data.images,
        model.tokenizer,
        template,
        model.image_token_id,
        model.num_image_tokens,
        model.preprocess,
        model.meta.max_length,
        stage.data.skip_bad_samples,
    )
    ds.look_token = model.meta.look_token
    ds.look_at = look_at(model.meta.readout)
    return ds


def prior_ref_task(model: MultimodalLM, stage: StageConfig, template: str) -> TaskResult:
    """PRIOR's reference LM: the model's `lm` on each caption alone (`[BOS] + caption`; no image, no prompt)."""
    return (
        model,
        P.CaptionTextDataset(_json_dataset(model, stage, template, "data.json (captions, LLaVA format)")),
        _speed_switches(model, stage, None),
    )


def prior_task(model: MultimodalLM, stage: StageConfig, template: str) -> TaskResult:
    """Captions with PRIOR token weights (see mllm.prior for the settings and the cache)."""
    ds = _json_dataset(model, stage, template, "data.json (captions, LLaVA format)")
    collate = _speed_switches(model, stage, ds)
    P.refuse_sidecar(stage.name, stage.data.json)
    settings, source = (
        (stage.prior, "the recipe") if stage.prior is not None else (P.PriorConfig(), "defaults")
    )
    if (
        settings.ref_stage() is not None
    ):  # the runner resolves it against the run folder (mllm.prior.resolve_ref)
        raise ValueError(
            f"stage {stage.name!r}: prior.ref {settings.ref!r} names a stage, which needs a run folder"
        )
    ref = P.reference_from(model.lm, settings, len(model.tokenizer))
    fp = P.fingerprint(model.tokenizer, ref, settings, template)
    data = Path(stage.data.json)
    cache_dir = (
        Path(settings.cache)
        if settings.cache
        else data.parent / "prior_cache" / f"{data.stem}-{P.digest(fp)[:16]}"
    )
    if P.cache_exists(cache_dir):
        P.check_fingerprint(cache_dir, fp)  # every rank refuses a stale cache, none waits on rank 0 for it
    elif is_main():
        print(
            f"[{stage.name}] PRIOR weights (settings from {source}: alpha={settings.alpha}, "
            f"floor={settings.floor}, cap={settings.cap}, ref={settings.ref or 'the model lm'}) -> {cache_dir}"
        )
        P.save_cache(cache_dir, P.compute_weights(ref.to(device()), ds, settings), fp)
    barrier()
    del ref
    return model, P.PriorDataset(ds, P.WeightCache(cache_dir, fp)), collate


def geoglip_task(model: MultimodalLM, stage: StageConfig, template: str) -> TaskResult:
    """data.json is a GeoWorld `scenes.jsonl`; only the fused model's geometric encoder (`geo`) trains."""
    if not stage.data.json:
        raise ValueError(f"stage {stage.name!r}: data.json (a GeoWorld scenes.jsonl) is not set")
    geo = getattr(model, "geo", None)
    if geo is None:
        raise ValueError(
            f"stage {stage.name!r} trains a geometric encoder but the model has none; "
            "set model.fusion: {type: router, geo: {...}}"
        )
    ds = GeoFigureDataset(
        stage.data.json, stage.data.images, geo.config.image_size, geo.preprocess, geo.config.classes
    )
    return GeoDetector(geo), ds, collate_geo


register_family(
    Family(
        "mllm",
        _build_mllm,
        MultimodalLM.from_pretrained,
        lambda p: (Path(p) / "mllm.json").is_file(),
        tasks={
            "conversation": conversation_task,
            "scene_labels": scene_labels_task,
            "prior_ref": prior_ref_task,
            "prior": prior_task,
            "geoglip": geoglip_task,
        },
        stages=(
            StageKind(
                "lm_pretrain", {"lm": 1.0}, doc="text-only next-token training of the LM (demo warm start)"
            ),
            StageKind(
                "tower_warmup",
                {"tower": 1.0, "heads": 1.0, "count": 1.0},
                task="scene_labels",
                doc="supervised per-patch warm-up of a from-scratch tower on GeoWorld scene graphs",
            ),
            StageKind(
                "align",
                {"projector": 1.0},
                template="plain",
                optional={"router": 1.0, "readout": 1.0},
                doc="projector (and a fused model's router, a readout) alignment on captions",
            ),
            StageKind(
                "instruct",
                {"projector": 1.0, "lm": 1.0},
                optional={"router": 1.0, "readout": 1.0},
                doc="instruction tuning of projector + LM (+ router, readout; recipes give it its own lr)",
            ),
            # SVE-Math's geometric encoder (encoders.geo), trained on GeoWorld figures before it is frozen.
            StageKind(
                "geoglip",
                {"geo": 1.0},
                task="geoglip",
                doc="GeoGLIP-style detection training of `geo` (boxes, junctions, boundaries)",
            ),
            # PRIOR (mllm.prior): a text-only reference LM on the captions, then alignment with per-token weights.
            StageKind(
                "prior_ref",
                {"lm": 1.0},
                template="plain",
                task="prior_ref",
                doc="PRIOR reference: the LM on `[BOS] + caption` text alone (no image, no prompt)",
            ),
            StageKind(
                "prior",
                {"projector": 1.0},
                template="plain",
                task="prior",
                doc="PRIOR alignment: projector on captions, tokens weighted by (1 - P_ref)^alpha",
            ),
        ),
        doc="MultimodalLM: tower + projector + causal LM (mllm.model)",
    )
)
