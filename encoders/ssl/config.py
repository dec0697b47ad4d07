"""The settings of self-distillation: DINO's views (`AugmentConfig`), DINO + iBOT (`DistillConfig`) and
model kind `ssl` (`SSLConfig`, the recipe's `model.encoder`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from encoders.common import from_dict


@dataclass
class AugmentConfig:
    """DINO's view recipe at GeoWorld scale. Scales are fractions of the image area."""

    global_scale: tuple[float, float] = (0.4, 1.0)  # DINO: (0.32, 1.0); GeoWorld objects are small
    local_crops: int = 0  # extra small views for the student only (multi-crop); 0 = two global views only
    local_size: int = 32  # px; Dinov2 interpolates its position embeddings, so any multiple of the patch
    local_scale: tuple[float, float] = (0.1, 0.4)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    # Brightness/contrast/saturation factors are drawn in [1 - s, 1 + s]. Colour is a label in GeoWorld,
    # so hue is never jittered (it would teach the tower that red == blue).
    jitter: float = 0.3


@dataclass
class DistillConfig:
    """DINO + iBOT settings. Defaults are DINO/iBOT's ViT-S values scaled down where GeoWorld is tiny."""

    out_dim: int = 1024  # prototypes of the CLS head (DINO: 65536; 1024 suffices for a few thousand images)
    patch_out_dim: int = 1024  # prototypes of the patch (iBOT) head; a separate head, as in DINOv2
    head_hidden: int = 512
    head_bottleneck: int = 128
    head_layers: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.07  # final teacher temperature (sharpening)
    teacher_temp_warmup: float = 0.04  # initial teacher temperature, raised linearly to teacher_temp
    teacher_temp_warmup_steps: int = 30
    center_momentum: float = 0.9
    ema_momentum: float = 0.996  # teacher momentum at step 0, raised along a cosine to ema_momentum_end
    ema_momentum_end: float = 1.0
    mask_prob: float = 0.5  # share of global views that get a patch mask (iBOT)
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # masked share of patches, drawn uniformly per view
    dino_weight: float = 1.0
    ibot_weight: float = 1.0


@dataclass
class SSLConfig:
    """`ModelConfig.encoder` of model kind `ssl`."""

    distill: DistillConfig = field(default_factory=DistillConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    export: str = "student"  # which weights become image_tower/: "student" | "teacher" (DINO evaluates the
    # teacher; in a few hundred steps the EMA lags the student, so the tiny recipes keep the student)
    # What trains the tower: encoders.ssl.tower_objectives.TOWER_OBJECTIVES (dino: DINO + iBOT, `distill`;
    # swav, supcon, pixpro, mlcd: their own options in objective_args). Checked when the recipe loads.
    objective: str = "dino"
    objective_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # inside: tower_objectives imports augment and distill (PixPro), which import this module
        from encoders.ssl.tower_objectives import check_objective

        check_objective(self)


def config_from_dict(cls: type, data: dict[str, Any] | None, where: str) -> Any:
    """A nested config dataclass from a recipe's free-form dict; unknown keys are errors naming the key."""
    return from_dict(cls, data or {}, where)
