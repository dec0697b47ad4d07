"""Training stages as data: which modules train, with which learning-rate multiplier, on which format.

A stage kind is one registry entry. A recipe's stage may override `trainable` (module prefix ->
learning rate) to train something else, e.g. the tower during `instruct` in the CPU demo, without a
line of code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


STAGE_KINDS: dict[str, StageKind] = {}


def register_stage(kind: StageKind) -> StageKind:
    STAGE_KINDS[kind.name] = kind
    return kind


register_stage(StageKind("lm_pretrain", {"lm": 1.0}, doc="text-only next-token training of the LM (demo warm start)"))
register_stage(StageKind("tower_warmup", {"tower": 1.0, "heads": 1.0, "count": 1.0}, task="scene_labels",
                         doc="supervised per-patch warm-up of a from-scratch tower on GeoWorld scene graphs"))
register_stage(StageKind("align", {"projector": 1.0}, template="plain", doc="projector alignment on captions"))
register_stage(StageKind("instruct", {"projector": 1.0, "lm": 1.0}, doc="instruction tuning of projector + LM"))
# PRIOR (mllm.prior): a text-only reference LM on the captions, then alignment with per-token weights.
register_stage(StageKind("prior_ref", {"lm": 1.0}, template="plain", task="prior_ref",
                         doc="PRIOR reference: the LM on `[BOS] + caption` text alone (no image, no prompt)"))
register_stage(StageKind("prior", {"projector": 1.0}, template="plain", loss="weighted_next_token", task="prior",
                         doc="PRIOR alignment: projector on captions, tokens weighted by (1 - P_ref)^alpha"))


def get_stage_kind(name: str) -> StageKind:
    if name not in STAGE_KINDS:
        raise ValueError(f"unknown stage kind {name!r}; known: {sorted(STAGE_KINDS)}")
    return STAGE_KINDS[name]


def resolve_trainable(stage: StageConfig) -> dict[str, float]:
    """Module prefix -> absolute learning rate for this stage."""
    if stage.trainable is not None:
        return dict(stage.trainable)
    kind = get_stage_kind(stage.kind)
    return {prefix: stage.lr * mult for prefix, mult in kind.trainable.items()}


def resolve_template(stage: StageConfig, model_template: str) -> str:
    if stage.data.template:
        return stage.data.template
    return get_stage_kind(stage.kind).template or model_template
