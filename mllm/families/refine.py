"""Stage kind `refine`: CLIP-Refine post-pre-training (encoders.refine) of a trained contrastive pair.

Not a family of its own: it trains the `contrastive` family's model (and TIPS / CLOC pairs, which are
contrastive models), so it registers one task and one stage kind beside that family's. A recipe runs it
after a `contrastive` stage (or on a pair loaded with `model.init_from`), usually with `init:` naming the
stage whose final model is the pre-trained one; the stage's `refine:` section (encoders.refine.RefineConfig)
holds its settings and is refused on any other kind of stage when the recipe loads.
"""

from __future__ import annotations

from encoders.contrastive import ContrastiveModel
from encoders.refine import RefineConfig, RefineModule
from mllm.config import StageConfig
from mllm.families.base import STAGE_KINDS, TASKS, StageKind, TaskResult
from mllm.families.contrastive import contrastive_task


def refine_task(model: ContrastiveModel, stage: StageConfig, template: str) -> TaskResult:
    """The pair on image-caption pairs (the contrastive task's data), trained by CLIP-Refine's
    HyCD + RaFA against a frozen copy of itself as it starts the stage."""
    if not isinstance(model, ContrastiveModel):
        raise ValueError(
            f"stage {stage.name!r} is a CLIP-Refine stage but the model is a {type(model).__name__}; "
            "it refines a trained contrastive pair (model.kind: contrastive)"
        )
    _, ds, collate = contrastive_task(model, stage, template)
    return RefineModule(model, stage.refine or RefineConfig()), ds, collate


TASKS.register("refine", refine_task)
STAGE_KINDS.register(
    "refine",
    StageKind(
        "refine",
        {"image_tower": 1.0, "text_tower": 1.0, "heads": 1.0},
        template="plain",
        task="refine",
        doc="CLIP-Refine: HyCD + RaFA post-pre-training of a trained contrastive pair (encoders.refine)",
    ),
)
