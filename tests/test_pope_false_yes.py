"""scripts/pope_false_yes.py counts false yeses from evidence units shaped as `mllm evidence` writes them."""

from __future__ import annotations

import pytest
from scripts_loader import load_script


def _unit(i: int, split: str, present: bool, said_yes: bool) -> dict:
    # the shape of a unit in B/<arm>/s<seed>/eval/pope.json (mllm/evidence/units.py)
    return {
        "id": f"{split}/{i}",
        "group": split,
        "correct": int(present == said_yes),
        "yes": int(said_yes),
        "tp": int(present and said_yes),
        "fp": int(not present and said_yes),
        "fn": int(present and not said_yes),
    }


def test_false_yes_counts_only_absent_objects_of_the_split():
    fy = load_script("pope_false_yes").false_yes
    units = (
        [_unit(i, "adversarial", True, i % 2 == 0) for i in range(6)]  # misses must not count
        + [_unit(10 + i, "adversarial", False, i < 1) for i in range(4)]  # 1 of 4 absent said yes
        + [_unit(20 + i, "random", False, True) for i in range(4)]  # another split
    )
    assert fy(units, "adversarial", "x") == pytest.approx(25.0)
    assert fy(units, "random", "x") == pytest.approx(100.0)
    with pytest.raises(ValueError, match="popular"):
        fy(units, "popular", "x")
