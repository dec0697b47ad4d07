"""Training stages as data: which modules train, with which learning-rate multiplier, on which format.

A stage kind is one registry entry. A recipe's stage may override `trainable` (module prefix ->
learning rate) to train something else, e.g. the tower during `instruct` in the CPU demo, without a
line of code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from mllm.config import StageConfig


@dataclass(frozen=True)
class StageKind:
    name: str
    # module prefix -> learning-rate multiplier of the stage's `lr`
    trainable: dict[str, float] = field(default_factory=dict)
    template: str | None = None  # None: the model's template
    loss: str = "next_token"  # next_token | weighted_next_token
    task: str = "conversation"  # registry key in mllm.training.tasks: what module and data the stage trains
    doc: str = ""
    # Like `trainable`, for modules only some models have (a fused model's `router`): trained when present.
    optional: dict[str, float] = field(default_factory=dict)


STAGE_KINDS: dict[str, StageKind] = {}


def register_stage(kind: StageKind) -> StageKind:
    STAGE_KINDS[kind.name] = kind
    return kind


register_stage(StageKind("lm_pretrain", {"lm": 1.0}, doc="text-only next-token training of the LM (demo warm start)"))
register_stage(StageKind("tower_warmup", {"tower": 1.0, "heads": 1.0, "count": 1.0}, task="scene_labels",
                         doc="supervised per-patch warm-up of a from-scratch tower on GeoWorld scene graphs"))
register_stage(StageKind("align", {"projector": 1.0}, template="plain", optional={"router": 1.0},
                         doc="projector (and a fused model's router) alignment on captions"))
register_stage(StageKind("instruct", {"projector": 1.0, "lm": 1.0}, optional={"router": 1.0},
                         doc="instruction tuning of projector + LM (+ router; recipes give it its own lr)"))
# SVE-Math's geometric encoder (encoders.geo), trained on GeoWorld figures before it is frozen in the MLLM.
register_stage(StageKind("geoglip", {"geo": 1.0}, task="geoglip",
                         doc="GeoGLIP-style detection training of `geo` (boxes, junctions, boundaries)"))
# PRIOR (mllm.prior): a text-only reference LM on the captions, then alignment with per-token weights.
register_stage(StageKind("prior_ref", {"lm": 1.0}, template="plain", task="prior_ref",
                         doc="PRIOR reference: the LM on `[BOS] + caption` text alone (no image, no prompt)"))
register_stage(StageKind("prior", {"projector": 1.0}, template="plain", loss="weighted_next_token", task="prior",
                         doc="PRIOR alignment: projector on captions, tokens weighted by (1 - P_ref)^alpha"))
# Contrastive encoders (encoders.ContrastiveModel, model kind "contrastive"); the loss is the recipe's
# `model.encoder.objective` (encoders.objectives).
register_stage(StageKind("contrastive", {"image_tower": 1.0, "text_tower": 1.0, "heads": 1.0}, template="plain",
                         loss="contrastive", task="contrastive",
                         doc="image + text towers + heads on GeoWorld captions.jsonl (data.caption picks which)"))
# Self-supervised and localised encoders (encoders.ssl / tips / cloc); EMA teachers need ZeRO <= 2.
register_stage(StageKind("ssl", {"image_tower": 1.0, "distill": 1.0}, template="plain", task="ssl",
                         doc="DINO + iBOT self-distillation of a Dinov2 tower on GeoWorld images (no text)"))
register_stage(StageKind("tips", {"image_tower": 1.0, "text_tower": 1.0, "heads": 1.0, "cls2_proj": 1.0,
                                  "distill": 1.0}, template="plain", task="tips",
                         doc="TIPS: CLS1<->short, CLS2<->long caption + DINO + iBOT (captions.jsonl)"))
register_stage(StageKind("cloc", {"image_tower": 1.0, "text_tower": 1.0, "heads": 1.0, "prompter": 1.0},
                         template="plain", task="cloc",
                         doc="CLOC: CLIP + region-text InfoNCE + grounding (captions.jsonl + regions.jsonl)"))


def get_stage_kind(name: str) -> StageKind:
    if name not in STAGE_KINDS:
        raise ValueError(f"unknown stage kind {name!r}; known: {sorted(STAGE_KINDS)}")
    return STAGE_KINDS[name]


def resolve_trainable(stage: StageConfig, model: nn.Module | None = None) -> dict[str, float]:
    """Module prefix -> absolute learning rate for this stage (`model`: to resolve the kind's optional ones)."""
    if stage.trainable is not None:
        return dict(stage.trainable)
    kind = get_stage_kind(stage.kind)
    present = {name for name, _ in model.named_children()} if model is not None else set()
    optional = {k: v for k, v in kind.optional.items() if k in present}
    return {prefix: stage.lr * mult for prefix, mult in {**kind.trainable, **optional}.items()}


def resolve_template(stage: StageConfig, model_template: str) -> str:
    if stage.data.template:
        return stage.data.template
    return get_stage_kind(stage.kind).template or model_template
