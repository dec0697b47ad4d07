"""Recipes: dataclass configs loaded from YAML, merged with `key=value` overrides.

One recipe file says everything a run needs (model, data, stages, engine), so a run folder that keeps
the resolved recipe can be reproduced from it alone. Dataclasses (not free dicts) make a typo in a
recipe an error naming the key instead of a silently ignored setting.
"""

from __future__ import annotations

import copy
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from encoders.albef import AlbefEncoderConfig
from encoders.cloc import ClocEncoderConfig
from encoders.common import ConfigError as ConfigError
from encoders.common import from_dict as from_dict
from encoders.common import to_dict as to_dict
from encoders.contrastive import EncoderConfig
from encoders.degla import DeglaEncoderConfig
from encoders.geo import GeoConfig
from encoders.objectives import OBJECTIVES
from encoders.objectives_cluster import objective_least_batch
from encoders.refine import RefineConfig
from encoders.registry import Registry
from encoders.ssl.config import SSLConfig
from encoders.ssl.tower_objectives import least_batch as ssl_least_batch
from encoders.tips import TipsEncoderConfig
from encoders.towers import TowerConfig
from mllm.cgvlm import CgVlmConfig
from mllm.data.caption_aug import IMAGE_AUGMENTS
from mllm.data.captions import CAPTION_MODES
from mllm.readout import check_readout


@dataclass
class LMConfig:
    """The causal LM: a local Hugging Face directory, or a config to build one from scratch."""

    path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    init: str = "default"  # how a from-config LM's weights start: mllm.lm_init.LM_INITS (default | mimetic)


@dataclass
class TokenizerConfig:
    """Where the tokenizer comes from. With no path, the project trains its own on the data's text."""

    path: str | None = None
    vocab_size: int = 2048
    image_token: str = "<image>"


@dataclass
class FusionConfig:
    """A fused vision side (see mllm.vision): two towers (MoF) or CLIP + geometric encoder + router (SVE-Math).

    type: mof_additive | mof_interleaved (needs `tower2`) | router (needs `geo` or `geo_path`).
    """

    type: str = "mof_interleaved"
    tower2: TowerConfig | None = None  # MoF: the second tower (e.g. DINOv2)
    alpha: float = 0.5  # mof_additive: F = alpha * tower + (1 - alpha) * tower2
    resample: str = "none"  # MoF: none | bilinear (second stream's grid resized to the first's)
    # mof_interleaved: the second stream's projector (mllm.projectors); None: the model's `projector`. A
    # readout reads the first stream, whose projector is the model's.
    projector2: str | None = None
    # mof_interleaved: the projected tokens a readout's look pools: "first" (the first stream's, which the
    # look attends over) | "both" (at each grid cell, the first stream's plus the second's: the look still
    # chooses where from the first stream, and what it carries from there also holds the second's)
    look: str = "first"
    geo: GeoConfig | None = None  # router: the geometric encoder's architecture (random init)
    geo_path: str | None = None  # router: a trained encoder folder (encoders.geo.GeoEncoder.save_pretrained)
    router_mode: str = "soft"  # router: soft (learned sigmoid weights) | constant (fixed equal weights)
    # router: concat ([CLIP | routed levels], the paper's layout, a wider projector input) | residual (CLIP +
    # routed levels, starting at zero: the tower's width, so it grafts onto a model's projector and readout)
    router_merge: str = "concat"
    image_size: int | None = None  # canonical input size both parts resample from; None: the largest input


@dataclass
class ModelConfig:
    tower: TowerConfig = field(default_factory=TowerConfig)
    fusion: FusionConfig | None = None  # None: the single-tower LLaVA layout
    projector: str = "mlp2x_gelu"
    lm: LMConfig = field(default_factory=LMConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    template: str = "chatml"
    max_length: int = 512
    box_format: str = "norm1"  # how the model writes boxes: norm1 | norm1000 | pixel (grounding data + eval)
    # Where `<image>` goes beside a question in generated data, evaluation and chat: "before" (LLaVA's
    # `<image>\n{q}`) or "after" (`{q}\n<image>`); see mllm.chat.IMAGE_PLACEMENTS.
    image_placement: str = "before"
    # A question-conditioned readout (mllm.readout.READOUTS, e.g. {type: focus, heads: 4, dim: 64}): a look
    # token after every question, filled from the image by attention with the question's words. None:
    # LLaVA's layout (the LM alone finds what a question names among the image tokens).
    readout: dict[str, Any] | None = None
    # Start from a saved model directory (a previous stage's output) instead of building.
    init_from: str | None = None
    # Tower/LM paths that are not local folders are hub names, downloaded only when this is true.
    allow_network: bool = False
    # What the recipe trains: a model family registered in mllm.families.FAMILIES ("mllm" = MultimodalLM,
    # "contrastive" = encoders.ContrastiveModel, ...). `tower` is the image tower of every kind.
    kind: str = "mllm"
    # The encoder family's settings, typed by `kind` (ENCODER_CONFIGS: contrastive -> EncoderConfig,
    # tips -> TipsEncoderConfig, cloc -> ClocEncoderConfig, ssl -> SSLConfig) and checked when the recipe
    # loads, unknown keys refused. Omitted: that class's defaults. A kind without an entry (mllm) takes none.
    encoder: EncoderConfig | SSLConfig | None = None

    def __post_init__(self) -> None:
        self.encoder = encoder_config_for(self.kind, self.encoder)
        if self.readout is not None:
            check_readout(self.readout)


# model.kind -> the dataclass of its `model.encoder` section (a tagged union keyed by the kind). Here, not
# in the family registry (mllm.families), because a recipe is checked when it loads, below training; a new
# family with an encoder section registers its class here too (`ENCODER_CONFIGS.register(kind, cls)`).
ENCODER_CONFIGS: Registry[type] = Registry("encoder config")
ENCODER_CONFIGS.register("contrastive", EncoderConfig)
ENCODER_CONFIGS.register("tips", TipsEncoderConfig)
ENCODER_CONFIGS.register("cloc", ClocEncoderConfig)
ENCODER_CONFIGS.register("albef", AlbefEncoderConfig)
ENCODER_CONFIGS.register("degla", DeglaEncoderConfig)
ENCODER_CONFIGS.register("ssl", SSLConfig)


def encoder_config_for(kind: str, raw: Any) -> Any:
    """`model.encoder` as the dataclass of model kind `kind` (from plain data or an instance), or None for a
    kind that takes no encoder section (a non-empty one there is an error, not silently ignored)."""
    cls = ENCODER_CONFIGS.get(kind)
    if cls is None:
        if raw:
            hint = "; did you mean model.kind: contrastive?" if kind == "mllm" else ""
            keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise ConfigError(
                f"model.encoder {keys} is set but model.kind {kind!r} takes no encoder section{hint}"
            )
        return None
    if raw is None:
        return cls()
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(
            f"model.encoder: model.kind {kind!r} takes a {cls.__name__} (a mapping), got {type(raw).__name__}"
        )
    return from_dict(cls, raw, "model.encoder")


@dataclass
class LiveWorldConfig:
    """GeoWorld drawn on the fly (mllm.data.geoworld.live): a fresh scene for every training sample.

    Set as a stage's `data.live` in place of `data.json`. `heldout` names the written world whose
    benchmark scenes training must never draw (the demo's world); `augment` is an
    `mllm.data.geoworld.augment.AugmentConfig` as a mapping (None: GeoWorld's exact pixels).
    """

    seed: int = 1  # the stream's seed; a world's own files use stream names that never collide with "live"
    n: int = 1_000_000  # virtual samples: more than any stage draws, so none repeats
    size: int = 64
    max_shapes: int = 5
    math_frac: float = 0.1
    content: str = "qa"  # "qa" (many QA turns per image) | "caption" (alignment captions)
    turns: tuple[int, int] = (6, 10)  # GeoWorld questions per image, drawn in [lo, hi]
    existence: int = 2  # extra POPE-style existence probes per image
    # The share of existence questions (GeoWorld's own and the probes) answered "yes", and the share of
    # their "no" objects that are near misses (a present shape in another colour). 0.5 / 0.5 is the demo's
    # balanced, visual mix; a yes-heavy mix with only easy negatives is LLaVA-Instruct's, the data the
    # POPE paper blames for a "yes" bias: a base trained on it is where hallucination methods have room.
    existence_yes: float = 0.5
    existence_near: float = 0.5
    # referring-expression turns per image, asked in LLaVA-1.5's grounding prompt and answered with the
    # object's box in 0-1 of the image (mllm.data.grounding): what the RefCOCO benchmark asks. 0: none
    grounding: int = 0
    paraphrase_frac: float = 0.3  # share of questions asked in a training-only wording
    mc_frac: float = 0.2  # share asked as "(a) X (b) Y" multiple choice
    # How a multiple-choice question is answered in training: "letter" ("(b)", MMVP's own answer key),
    # "option" (the chosen option's words, "orange": what MMVP's grading and mllm's extractor also accept)
    # or "both" (the words, then the letter: "orange (b)")
    mc_reply: str = "letter"
    heldout: str | None = None
    augment: dict | None = None
    # Scenes grow from one object to `max_shapes` over the first `curriculum` samples (0: no
    # curriculum). Indices must arrive in order for this to be a curriculum: needs data.sampler sequential.
    curriculum: int = 0

    def __post_init__(self) -> None:
        for key in ("existence_yes", "existence_near"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ConfigError(f"data.live.{key} must be a share in [0, 1], got {v!r}")


@dataclass
class DataConfig:
    """A LLaVA-format JSON file and the folder its image paths are relative to."""

    json: str | None = None
    images: str | None = None
    template: str | None = None  # overrides ModelConfig.template for this stage (e.g. "plain" for align)
    skip_bad_samples: bool = False
    num_workers: int = 0
    # Micro-batch order (mllm.data.samplers): "random" | "modality_length" (LLaVA's group_by_modality_length).
    sampler: str = "random"
    # Contrastive stages on a GeoWorld captions.jsonl: which caption pairs with the image,
    # "long" (exact) | "short" (noisy) | "random" (either, drawn per fetch).
    caption: str = "long"
    # Sequence packing (mllm.data.packing): each micro-batch's samples share rows of at most
    # `pack_length` tokens (None: the model's max_length), each attending only to itself.
    packing: bool = False
    pack_length: int | None = None
    # Frozen-tower feature cache (mllm.feature_cache): tower outputs computed once, stored in
    # `feature_dtype` (float16 | bfloat16) under `feature_cache_dir` (None: beside the data file).
    feature_cache: bool = False
    feature_cache_dir: str | None = None
    feature_dtype: str = "float16"
    # GeoWorld drawn on the fly instead of `json` (see LiveWorldConfig).
    live: LiveWorldConfig | None = None
    # Contrastive stages, CLIP++ (Fini et al. 2023) and DreamLIP (mllm.data.caption_aug, mllm.data.captions):
    # `text_mask` drops each caption token with this probability, in [0, 1); `image_augment` names a
    # truth-preserving image augmentation ("photometric") or null; `sub_captions` K > 0 adds K of each
    # row's sub-captions to the batch (DreamLIP's multiple positives).
    text_mask: float = 0.0
    image_augment: str | None = None
    sub_captions: int = 0
    # `tower_warmup` on a GeoWorld scenes.jsonl: draw each row's image again from its scene graph with
    # mllm.data.geoworld.augment (an AugmentConfig mapping, {} for its defaults: shades, anti-aliasing,
    # sub-pixel placement, JPEG), one fixed drawing per row, so the tower's per-patch heads learn hue and
    # form rather than the renderer's exact pixels. null: the image files as they are.
    scene_augment: dict | None = None
    # `tower_warmup`: keep each sample in memory once made (mllm.data.memo). Its samples are a pure
    # function of the row (one fixed drawing each), so from the second epoch on this repeats the same
    # batches without drawing, labelling and preprocessing them again; costs the decoded pixels of
    # every row in memory (~50 kB a row at 64 px).
    cache_samples: bool = False

    def __post_init__(self) -> None:
        """The caption options, refused when the recipe loads (one line naming the key)."""
        if self.caption not in CAPTION_MODES:
            raise ConfigError(f"data.caption must be one of {CAPTION_MODES}, got {self.caption!r}")
        tm = self.text_mask
        if isinstance(tm, bool) or not isinstance(tm, (int, float)) or not 0.0 <= tm < 1.0:
            raise ConfigError(f"data.text_mask must be a number in [0, 1), got {tm!r}")
        if self.image_augment is not None and self.image_augment not in IMAGE_AUGMENTS:
            raise ConfigError(
                f"data.image_augment must be one of {IMAGE_AUGMENTS} or null, got {self.image_augment!r}"
            )
        k = self.sub_captions
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigError(f"data.sub_captions must be an integer >= 0, got {k!r}")


@dataclass
class LoraConfig:
    """LoRA on the stage's LM (mllm.lora, via peft). Defaults are LLaVA-1.5's LoRA recipe (r 128, alpha 256)."""

    r: int = 128
    alpha: float = 256.0
    dropout: float = 0.05
    targets: list[str] = field(
        default_factory=lambda: ["all-linear"]
    )  # module names, or every Linear but the head
    quantize: str | None = None  # "4bit": QLoRA; refused clearly where bitsandbytes or a CUDA GPU is missing


@dataclass
class EvalConfig:
    """What a stage's periodic evaluation (`eval_every`) answers. A small held-out slice (`limit` items,
    taken round-robin over the benchmark's categories) keeps a learning curve cheap enough to draw every
    few hundred steps; the full benchmark is `mllm eval`'s job on the final model."""

    benchmark: str = "qa"  # a key of mllm.evaluation.benchmarks.BENCHMARKS
    data: str | None = None  # the benchmark folder in its official layout (for qa: the GeoWorld root)
    limit: int | None = 96  # None: every item
    batch_size: int = 32
    max_new_tokens: int | None = None  # None: the benchmark's own
    options: dict[str, Any] = field(default_factory=dict)  # benchmark options, as `mllm eval --option`

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"eval.limit={self.limit} must be a positive number of items (or null: all)")
        if self.batch_size <= 0:
            raise ConfigError(f"eval.batch_size={self.batch_size} must be positive")


STAGE_REF = "stage:"  # PriorConfig.ref "stage:NAME": the LM of stage NAME's final model in this run


@dataclass
class PriorConfig:
    """A `prior` stage's PRIOR settings (mllm.prior), given as the stage's `prior:` section.

    ref: the reference causal-LM folder; "stage:NAME" is this run's `NAME/final/lm` (e.g. the
    `prior_ref` stage's); None: a frozen copy of the model's own LM at the start of the stage.
    alpha, floor, cap: w = clamp((1 - P_ref) ** alpha, floor, cap), renormalised per caption.
    cache: the weight-cache folder (None: `<data dir>/prior_cache/<data stem>-<digest>`).
    batch_size: captions per reference-LM forward when the weights are computed.
    """

    ref: str | None = None
    alpha: float = 1.0
    floor: float = 0.0
    cap: float = 1.0e9
    cache: str | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        # Floats whatever the caller passed: the values enter the cache fingerprint, where 1 != 1.0.
        self.alpha, self.floor, self.cap = float(self.alpha), float(self.floor), float(self.cap)
        if self.alpha < 0 or self.floor < 0 or self.cap < self.floor or self.batch_size < 1:
            raise ConfigError(
                f"prior: need alpha >= 0, 0 <= floor <= cap, batch_size >= 1; got alpha={self.alpha}, "
                f"floor={self.floor}, cap={self.cap}, batch_size={self.batch_size}"
            )
        if self.ref is not None and self.ref.startswith(STAGE_REF) and not self.ref[len(STAGE_REF) :]:
            raise ConfigError(f"prior.ref {self.ref!r} names no stage (write stage:NAME)")

    def ref_stage(self) -> str | None:
        """NAME when `ref` is "stage:NAME", else None."""
        return self.ref[len(STAGE_REF) :] if self.ref and self.ref.startswith(STAGE_REF) else None


@dataclass
class StageConfig:
    """A training stage as data: what trains, at which learning rate, on which data, for how long."""

    name: str = "align"
    kind: str = "align"  # a stage kind registered by a model family (mllm.families.STAGE_KINDS)
    data: DataConfig = field(default_factory=DataConfig)
    # module prefix -> learning rate; None means "use the stage kind's default declaration".
    trainable: dict[str, float] | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    # Per-stage ZeRO config (LLaVA aligns under ZeRO-2 and instruction-tunes under ZeRO-3);
    # None: the engine's.
    zero_config: str | None = None
    # The earlier stage whose final model this stage starts from; None: the stage just before it.
    # (PRIOR's alignment starts from the warm-up, not from the text-only reference LM stage.)
    init: str | None = None
    # LoRA adapters on the LM instead of full fine-tuning; final/ is saved merged, final/adapter/ in peft format.
    lora: LoraConfig | None = None
    # Activation recomputation in the LM and tower (HF gradient checkpointing, use_reentrant=False):
    # less memory for about one more forward pass. `compile`: torch.compile the LM's decoder layers.
    # Both off by default; docs/performance.md has the measurements.
    gradient_checkpointing: bool = False
    compile: bool = False
    # tower_warmup only: the per-patch heads are the first rows of the MLLM projector's first Linear
    # (encoders.supervised.PatchSupervision `readout`), so they are kept, not discarded.
    readout_heads: bool = False
    # Evaluate `eval` every this many optimiser steps and at the last one (RUN/<stage>/evals.jsonl,
    # drawn by `mllm plot`); None: no evaluation during training.
    eval_every: int | None = None
    eval: EvalConfig | None = None
    # PRIOR's settings, for a stage whose kind trains with PRIOR token weights (kind `prior`); None there
    # means the defaults. Refused (when the run starts) on any other kind of stage.
    prior: PriorConfig | None = None
    # CLIP-Refine's settings (encoders.refine.RefineConfig), for a stage of kind `refine` only; CG-VLM's
    # (mllm.cgvlm.CgVlmConfig), for a stage of kind `align` only. Refused on any other kind when the recipe loads.
    refine: RefineConfig | None = None
    cgvlm: CgVlmConfig | None = None

    def __post_init__(self) -> None:
        """Refused when the recipe loads, not hundreds of steps into a run. A stage sized by `epochs` is
        checked again at its start, once its length in steps is known."""
        for key, kind in (("refine", "refine"), ("cgvlm", "align")):
            if getattr(self, key) is not None and self.kind != kind:
                raise ConfigError(
                    f"stage {self.name!r}: stages.{self.name}.{key} is set but the stage's kind is "
                    f"{self.kind!r}; it belongs to a stage of kind {kind!r}"
                )
        if self.eval_every is None:
            return
        where = f"stage {self.name!r}: eval_every={self.eval_every}"
        if self.eval_every <= 0:
            raise ConfigError(f"{where} must be a positive number of optimiser steps")
        if self.max_steps is not None and self.eval_every > self.max_steps:
            raise ConfigError(f"{where} is larger than the stage (max_steps={self.max_steps})")
        if self.eval is None or not self.eval.data:
            raise ConfigError(
                f"{where} needs `eval.data` (what to evaluate, e.g. "
                "eval: {benchmark: qa, data: <world folder>})"
            )


@dataclass
class NonfiniteConfig:
    """What a non-finite (NaN/inf) loss does. `stop`: write a checkpoint of the last good state, then
    raise. `skip`: drop that optimiser step (no update, no schedule step; counted in metrics.jsonl and
    the checkpoint), and raise once more than `max_skips` steps were dropped in the stage."""

    policy: str = "stop"  # stop | skip
    max_skips: int = 10


@dataclass
class EngineConfig:
    backend: str = "deepspeed"  # deepspeed | torch
    # A ZeRO JSON: a path, or a packaged one by name (zero2, zero3, zero3_offload; mllm/ds/). The
    # spelling `train/ds/<name>.json` (every recipe's, and this default) names the packaged file too,
    # wherever the run starts: `resolve_zero_config`.
    zero_config: str | None = "train/ds/zero2.json"
    precision: str = "bf16"  # bf16 | fp32
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0 = only at the end of a stage
    keep_last: int = 2
    log_every: int = 10
    progress: bool = True
    dist_timeout_s: int = 600
    threads: int | None = None
    nonfinite: NonfiniteConfig = field(default_factory=NonfiniteConfig)
    # Metric sinks (mllm.logging_backends): jsonl is always written; tensorboard, wandb when named here.
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])
    # A scheduler's warning (SLURM: SIGTERM before the kill, SIGUSR1 with --signal): on any of these the
    # run finishes its optimiser step, writes a checkpoint and exits with status 75 for the job script to
    # requeue (mllm.training.preemption). [] leaves the signals' default actions alone.
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # Failed checkpoint writes (a full disk, an I/O error) survived in a row: each is logged and the save is
    # retried at the next interval. 0: the first one stops the run. The last good checkpoint stays intact.
    checkpoint_retries: int = 0

    def __post_init__(self) -> None:
        for name in self.preemption_signals:
            parse_signal(name, "engine.preemption_signals")
        if self.checkpoint_retries < 0:
            raise ConfigError(
                f"engine.checkpoint_retries={self.checkpoint_retries} must be >= 0 (0: stop at the first "
                "failed checkpoint write)"
            )


# Signals a process cannot catch, or that mean a fault rather than a request to stop.
_UNCATCHABLE = {"SIGKILL", "SIGSTOP", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT", "SIGCHLD"}


def parse_signal(name: str, where: str = "signal") -> signal.Signals:
    """`SIGTERM`, `TERM` or `sigterm` -> signal.SIGTERM; a name that is not a signal this process can
    catch is a ConfigError naming it (a typo must not leave the run deaf to its scheduler)."""
    key = str(name).strip().upper()
    key = key if key.startswith("SIG") else f"SIG{key}"
    sig = getattr(signal.Signals, key, None) if key.isidentifier() else None
    if sig is None or key in _UNCATCHABLE:
        why = "cannot be caught or is not a stop request" if sig is not None else "is not a signal"
        known = ", ".join(s for s in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGXCPU"))
        raise ConfigError(f"{where}: {name!r} {why}; use one of {known}")
    return sig


@dataclass
class Recipe:
    name: str = "recipe"
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: list[StageConfig] = field(default_factory=list)
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Free-form section for commands that wrap training (the demo's synth and eval settings) and the
    # `${name}` variables of the recipe's strings; it configures nothing in training itself.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.extra, dict) and "prior" in self.extra:
            raise ConfigError(
                "extra.prior is no longer read: PRIOR settings are the `prior` stage's own typed "
                "section; move them there (stages: - {name: prior, kind: prior, prior: {alpha: ...}}, "
                "override: stages.<stage>.prior.alpha=...)"
            )
        for s in self.stages:  # CLIP-Refine refines a contrastive pair (contrastive, tips, cloc kinds)
            if s.kind == "refine" and self.model.kind in ("mllm", "ssl"):
                raise ConfigError(
                    f"stage {s.name!r}: kind 'refine' (CLIP-Refine) refines a contrastive image-text pair, "
                    f"but model.kind is {self.model.kind!r}"
                )
        names = [s.name for s in self.stages]
        for s in self.stages:
            ref = s.prior.ref_stage() if s.prior is not None else None
            if ref is not None and ref not in names[: names.index(s.name)]:
                raise ConfigError(
                    f"stage {s.name!r}: prior.ref {s.prior.ref!r} is not an earlier stage of the "
                    f"recipe ({names[: names.index(s.name)]})"
                )

        # Prototypes filled within a batch (ProtoCLIP's k-means, SwAV's equipartition) need a batch at least
        # as large: refused here, naming the option (encoders.objectives_cluster, encoders.ssl.tower_objectives).
        enc = self.model.encoder
        least = (
            ssl_least_batch(enc)
            if isinstance(enc, SSLConfig)
            else objective_least_batch(enc.objective, enc.objective_args)
            if isinstance(enc, EncoderConfig)
            else None
        )
        for s in self.stages if least is not None else ():
            if s.batch_size < least[1]:
                raise ConfigError(
                    f"model.encoder.objective_args.{least[0]}={least[1]} needs a batch of at least "
                    f"{least[1]}; stages.{s.name}.batch_size is {s.batch_size}"
                )

        # DreamLIP's sub-captions (data.sub_captions = K) go with its objective and only with it; CLIP++'s
        # data switches are read by the `contrastive` stage kind only (mllm.families.contrastive).
        wants_sub = isinstance(enc, EncoderConfig) and "sub_txt" in OBJECTIVES[enc.objective].needs
        for s in self.stages:
            used = [k for k in ("text_mask", "image_augment", "sub_captions") if getattr(s.data, k)]
            if s.kind != "contrastive" and used:
                raise ConfigError(
                    f"stages.{s.name}.data.{used[0]}: read only by `contrastive` stages, this one is {s.kind!r}"
                )
            if s.data.cache_samples and s.kind != "tower_warmup":
                raise ConfigError(
                    f"stages.{s.name}.data.cache_samples: only `tower_warmup` samples are known to be the "
                    f"same at every epoch, this stage is {s.kind!r}"
                )
            if s.data.scene_augment is not None:
                if s.kind != "tower_warmup":
                    raise ConfigError(
                        f"stages.{s.name}.data.scene_augment: read only by `tower_warmup` stages, this one is {s.kind!r}"
                    )
                from mllm.data.geoworld.augment import AugmentConfig

                try:
                    from_dict(AugmentConfig, s.data.scene_augment, f"stages.{s.name}.data.scene_augment")
                except ConfigError:  # an unknown key: named already
                    raise
                except ValueError as e:  # a bad value
                    raise ConfigError(f"stages.{s.name}.data.scene_augment: {e}") from None
            if s.kind == "contrastive" and wants_sub != (s.data.sub_captions > 0):
                what = "needs K > 0 sub-captions per image" if wants_sub else "reads none (DreamLIP's option)"
                raise ConfigError(
                    f"stages.{s.name}.data.sub_captions={s.data.sub_captions}: objective {enc.objective!r} {what}"
                )

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"recipe {self.name!r} has no stage {name!r}; it has {[s.name for s in self.stages]}")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c=v` in a nested dict; list items are addressed by stage name (`stages.align.lr`)."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            match = [s for s in node if isinstance(s, dict) and s.get("name") == part]
            if not match:
                raise ConfigError(f"override {dotted!r}: no list item named {part!r}")
            node = match[0]
        else:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {dotted!r}: {'.'.join(parts[: i + 1])} is not a section")
    node[parts[-1]] = value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply CLI `key=value` pairs; values are parsed as YAML so `lr=1e-4` and `stages=[]` work."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


# Recipes and ZeRO configs ship inside the package (package data), so an installed wheel finds them
# without a checkout; a checkout's train/recipes and train/ds are links to these folders.
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
ZERO_DIR = Path(__file__).resolve().parent / "ds"
_LEGACY_RECIPES = ("train", "recipes")  # how docs and scripts spell the folders (relative to a checkout)
_LEGACY_ZERO = ("train", "ds")


def recipe_names() -> list[str]:
    """The packaged recipes, by the name `--recipe` takes."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file from a path, or a packaged recipe from its name (`clip-tiny`, `clip-tiny.yaml`).

    An existing file always wins. `train/recipes/<name>.yaml` that does not exist where the run starts
    (outside a checkout) is the packaged recipe of that name. An unknown bare name is a one-line error
    listing the known names; any other missing path is left for `load_recipe` to report.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    parts = path.parts
    if len(parts) == 1 or (not path.is_absolute() and parts[:-1] == _LEGACY_RECIPES):
        name = path.name[: -len(path.suffix)] if path.suffix in (".yaml", ".yml") else path.name
        packaged = RECIPES_DIR / f"{name}.yaml"
        if packaged.is_file():
            return packaged
        if len(parts) == 1 and not path.suffix:
            raise ConfigError(
                f"unknown recipe {str(name_or_path)!r}: not a file and not a packaged recipe "
                f"(known: {', '.join(recipe_names())})"
            )
    return path


def resolve_zero_config(path: str | None) -> str | None:
    """The ZeRO JSON a recipe's `zero_config` names, independent of the working directory for the packaged
    ones: `zero2`, `zero2.json` (when no such file is where the run starts) and `train/ds/zero2.json` (always)
    are mllm/ds/zero2.json; anything else is a path, returned as given."""
    if not path:
        return path
    p = Path(path)
    name = p.name if p.suffix == ".json" else f"{p.name}.json"
    packaged = ZERO_DIR / name
    if not packaged.is_file():
        return path
    if not p.is_absolute() and p.parts[:-1] == _LEGACY_ZERO:
        return str(packaged)
    if len(p.parts) == 1 and not p.is_file():
        return str(packaged)
    return path


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """A recipe from a YAML file or a packaged recipe's name (`find_recipe`), with `key=value` overrides."""
    path = find_recipe(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read recipe: {e}") from e
    apply_overrides(tree, overrides or [])
    tree = substitute(tree, tree.get("extra") or {})
    try:
        return from_dict(Recipe, tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def recipe_from_dict(tree: dict, overrides: list[str] | None = None) -> Recipe:
    tree = apply_overrides(copy.deepcopy(tree), overrides or [])
    tree = substitute(tree, tree.get("extra") or {})
    return from_dict(Recipe, tree)


_VAR = re.compile(r"\$\{(\w+)\}")


def substitute(tree: Any, variables: dict[str, Any]) -> Any:
    """Replace `${name}` in string values by `extra.name`, so one recipe serves any data folder."""
    if isinstance(tree, dict):
        return {k: (v if k == "extra" else substitute(v, variables)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [substitute(v, variables) for v in tree]
    if isinstance(tree, str):

        def repl(m: re.Match) -> str:
            if m.group(1) not in variables:
                raise ConfigError(f"${{{m.group(1)}}} is used but extra.{m.group(1)} is not set")
            return str(variables[m.group(1)])

        return _VAR.sub(repl, tree)
    return tree


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
