"""The vision side of mllm, usable on its own: towers (later also mixtures, routers, contrastive training)."""

from encoders import objectives_cluster as _objectives_cluster  # noqa: F401  (registers protoclip)
from encoders import objectives_extra as _objectives_extra  # noqa: F401  (registers convirt, mochi, ...)
from encoders import objectives_text as _objectives_text  # noqa: F401  (registers clippp, fdt)
from encoders.contrastive import ContrastiveModel
from encoders.fusion import MixtureOfFeatures
from encoders.geo import GeoConfig, GeoEncoder
from encoders.router import FeatureRouter
from encoders.text_tower import TextTowerConfig, build_text_tower
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
    "ContrastiveModel",
    "FeatureRouter",
    "GeoConfig",
    "GeoEncoder",
    "MixtureOfFeatures",
    "TextTowerConfig",
    "build_text_tower",
    "TINY_CONFIGS",
    "TOWERS",
    "Tower",
    "TowerConfig",
    "VisionFeatures",
    "build_tower",
    "register_tower",
]
