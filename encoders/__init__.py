"""The vision side of mllm, usable on its own: towers (later also mixtures, routers, contrastive training)."""

from encoders.towers import (
    TINY_CONFIGS,
    TOWERS,
    Tower,
    TowerConfig,
    VisionFeatures,
    build_tower,
    register_tower,
)

__all__ = [
    "TINY_CONFIGS",
    "TOWERS",
    "Tower",
    "TowerConfig",
    "VisionFeatures",
    "build_tower",
    "register_tower",
]
