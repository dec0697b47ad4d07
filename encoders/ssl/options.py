"""Checks shared by the option dataclasses of the tower objectives (`model.encoder.objective_args` of model
kind `ssl`): every refusal is a ConfigError naming the recipe key, raised when the recipe loads."""

from __future__ import annotations

import math
from typing import Any

from encoders.common import ConfigError

#: Where the options sit in a recipe; every message starts with the full dotted key.
WHERE = "model.encoder.objective_args"


def check_count(key: str, value: Any, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f"{WHERE}.{key} must be an integer >= {least}, got {value!r}")


def check_positive(key: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value <= 0:
        raise ConfigError(f"{WHERE}.{key} must be a positive number, got {value!r}")


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{WHERE}.{key} must be one of {choices}, got {value!r}")
