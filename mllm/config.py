"""Recipes: dataclass configs loaded from YAML, merged with `key=value` overrides.

One recipe file says everything a run needs (model, data, stages, engine), so a run folder that keeps
the resolved recipe can be reproduced from it alone. Dataclasses (not free dicts) make a typo in a
recipe an error naming the key instead of a silently ignored setting.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from encoders.geo import GeoConfig
from encoders.towers import TowerConfig


@dataclass
class LMConfig:
    """The causal LM: a local Hugging Face directory, or a config to build one from scratch."""

    path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False


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
    geo: GeoConfig | None = None  # router: the geometric encoder's architecture (random init)
    geo_path: str | None = None  # router: a trained encoder folder (encoders.geo.GeoEncoder.save_pretrained)
    router_mode: str = "soft"  # router: soft (learned sigmoid weights) | constant (fixed equal weights)
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
    # Start from a saved model directory (a previous stage's output) instead of building.
    init_from: str | None = None
    # Tower/LM paths that are not local folders are hub names, downloaded only when this is true.
    allow_network: bool = False
    # What the recipe trains: a registry key of mllm.training.models.MODEL_KINDS ("mllm" = MultimodalLM,
    # "contrastive" = encoders.ContrastiveModel, ...). `tower` is the image tower of every kind.
    kind: str = "mllm"
    # Kind-specific settings, validated by the kind (e.g. encoders.contrastive.EncoderConfig).
    encoder: dict[str, Any] = field(default_factory=dict)


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
    paraphrase_frac: float = 0.3  # share of questions asked in a training-only wording
    mc_frac: float = 0.2  # share asked as "(a) X (b) Y" multiple choice
    heldout: str | None = None
    augment: dict | None = None
    # Scenes grow from one object to `max_shapes` over the first `curriculum` samples (0: no
    # curriculum). Indices must arrive in order for this to be a curriculum: needs data.sampler sequential.
    curriculum: int = 0


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


@dataclass
class LoraConfig:
    """LoRA on the stage's LM (mllm.lora, via peft). Defaults are LLaVA-1.5's LoRA recipe (r 128, alpha 256)."""

    r: int = 128
    alpha: float = 256.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["all-linear"])  # module names, or every Linear but the head
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


@dataclass
class StageConfig:
    """A training stage as data: what trains, at which learning rate, on which data, for how long."""

    name: str = "align"
    kind: str = "align"  # registry key in mllm.training.stages
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

    def __post_init__(self) -> None:
        """Refused when the recipe loads, not hundreds of steps into a run. A stage sized by `epochs` is
        checked again at its start, once its length in steps is known."""
        if self.eval_every is None:
            return
        where = f"stage {self.name!r}: eval_every={self.eval_every}"
        if self.eval_every <= 0:
            raise ConfigError(f"{where} must be a positive number of optimiser steps")
        if self.max_steps is not None and self.eval_every > self.max_steps:
            raise ConfigError(f"{where} is larger than the stage (max_steps={self.max_steps})")
        if self.eval is None or not self.eval.data:
            raise ConfigError(f"{where} needs `eval.data` (what to evaluate, e.g. "
                              "eval: {benchmark: qa, data: <world folder>})")


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


@dataclass
class Recipe:
    name: str = "recipe"
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: list[StageConfig] = field(default_factory=list)
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Free-form section for commands that wrap training (the demo's synth and eval settings).
    extra: dict[str, Any] = field(default_factory=dict)

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"recipe {self.name!r} has no stage {name!r}; it has {[s.name for s in self.stages]}")


class ConfigError(ValueError):
    """A recipe that does not match the schema, with the dotted key that is wrong."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from plain data, refusing unknown keys (a typo must not pass silently)."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    tp = _strip_optional(tp)
    if value is None:
        return None
    if _is_dataclass_type(tp):
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        return tuple(value)
    if tp in (int, float, str, bool):
        return _scalar(tp, value, where)
    return value


def _scalar(tp: type, value: Any, where: str) -> Any:
    """Scalars with the conversions YAML needs (`2e-5` is a string in YAML 1.1), and no others."""
    if isinstance(value, tp) and not (tp is not bool and isinstance(value, bool)):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, str):
        try:
            return tp(value)
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


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


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
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
