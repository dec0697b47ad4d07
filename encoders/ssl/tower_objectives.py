"""The objectives of the self-supervised tower (model kind `ssl`, `model.encoder.objective`): DINO + iBOT
(`dino`, the default, `encoders.ssl.distill`), and those that replace it: SwAV (`swav`), SupCon
(`supcon`), PixPro (`pixpro`), MLCD (`mlcd`). One registry entry each: its options dataclass (`model.encoder.objective_args`) and its
module (heads + loss). Every objective sees the same views (`encoders.ssl.augment`), so the tiny recipes
compare them at equal data; an objective that needs more from the data names the batch fields (`needs`:
`class_labels` from the scene graphs, `view_boxes`: the global views' crop boxes, `cluster_labels`: MLCD's offline clusters), which `mllm.data.views_extra` adds.

`check_objective` runs when the recipe loads (SSLConfig.__post_init__): an unknown objective, an option
another objective owns, DINO's `distill` section under another objective, or a teacher export without a
teacher is refused, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from encoders.common import ConfigError, from_dict
from encoders.registry import Registry
from encoders.ssl.mlcd import MlcdObjective, MlcdOptions
from encoders.ssl.options import WHERE
from encoders.ssl.pixpro import PixProObjective, PixProOptions
from encoders.ssl.supcon import SupConObjective, SupConOptions
from encoders.ssl.swav import SwavObjective, SwavOptions

__all__ = ["TOWER_OBJECTIVES", "TowerObjective", "build_objective", "check_objective", "objective_options"]


@dataclass(frozen=True)
class TowerObjective:
    """A registry entry: `options` (None: takes no objective_args) and `module(options, hidden)`."""

    name: str
    options: type | None
    module: type[nn.Module] | None  # None: DINO + iBOT, built by SSLModel itself (SelfDistillation)
    doc: str = ""


TOWER_OBJECTIVES: Registry[TowerObjective] = Registry("ssl objective")
TOWER_OBJECTIVES.register(
    "dino", TowerObjective("dino", None, None, "DINO + iBOT self-distillation (model.encoder.distill)")
)
TOWER_OBJECTIVES.register(
    "swav", TowerObjective("swav", SwavOptions, SwavObjective, "SwAV swapped Sinkhorn-Knopp assignments")
)
TOWER_OBJECTIVES.register(
    "supcon",
    TowerObjective("supcon", SupConOptions, SupConObjective, "SupCon over scene-graph labels"),
)
TOWER_OBJECTIVES.register(
    "pixpro",
    TowerObjective("pixpro", PixProOptions, PixProObjective, "PixPro pixel propagation consistency"),
)
TOWER_OBJECTIVES.register(
    "mlcd",
    TowerObjective("mlcd", MlcdOptions, MlcdObjective, "MLCD multi-label cluster discrimination"),
)


def objective_options(name: str, args: dict[str, Any]) -> Any:
    """The typed options of objective `name` (None for dino), refusing unknown keys with the full key."""
    if name not in TOWER_OBJECTIVES:
        raise ConfigError(f"model.encoder.objective: unknown {name!r}; known: {TOWER_OBJECTIVES.known()}")
    entry = TOWER_OBJECTIVES[name]
    if not isinstance(args, dict):
        raise ConfigError(f"{WHERE} must be a mapping, got {type(args).__name__}")
    if entry.options is None:
        if args:
            raise ConfigError(
                f"{WHERE} {sorted(args)} is set but objective {name!r} takes none "
                "(DINO's settings are model.encoder.distill)"
            )
        return None
    return from_dict(entry.options, args, WHERE)


def check_objective(cfg: Any) -> None:
    """The ssl encoder config's objective section, as the recipe loads (cfg: an SSLConfig)."""
    objective_options(cfg.objective, cfg.objective_args)
    if cfg.objective != "dino":
        if cfg.distill != type(cfg.distill)():
            raise ConfigError(
                f"model.encoder.distill is DINO + iBOT's section; objective {cfg.objective!r} does not "
                "use it (its settings are model.encoder.objective_args)"
            )
        if cfg.export != "student":
            raise ConfigError(
                f"model.encoder.export {cfg.export!r}: objective {cfg.objective!r} has no EMA teacher; "
                "use student"
            )


def build_objective(cfg: Any, tower: Any) -> nn.Module:
    """The module of a non-DINO objective (cfg: an SSLConfig; tower: the encoders.towers.Tower it trains)."""
    entry = TOWER_OBJECTIVES[cfg.objective]
    if entry.module is None:
        raise ValueError(f"objective {cfg.objective!r} is built by SSLModel itself")
    return entry.module(objective_options(cfg.objective, cfg.objective_args), tower)


def least_batch(cfg: Any) -> tuple[str, int] | None:
    """(option key, the least batch it needs) for an objective whose options set one, else None."""
    opts = objective_options(cfg.objective, cfg.objective_args)
    fn = getattr(opts, "least_batch", None)
    return fn() if fn is not None else None
