"""Per-item rows for the statistics: each benchmark's scored records turned into the units a paired
bootstrap resamples (an id, a group such as a POPE split or an MMVP pattern, and numeric columns).

Why units and not records: some benchmarks are scored on pairs (MMVP and MMVP-VLM count a pair right
only when both of its questions are), so the item a bootstrap resamples must be the pair; POPE's F1 needs
tp / fp / fn per question; retrieval's R@1 and R@5 are per query. A registry entry per benchmark keeps
that knowledge next to the benchmark's name rather than in the statistics.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]
#: records (as `mllm eval` writes them) and the benchmark's data folder -> unit rows
UnitMaker = Callable[[Sequence[Row], Path], list[Row]]


def _qa(records: Sequence[Row], data: Path) -> list[Row]:
    return [{"id": r["id"], "group": r["category"], "correct": int(r["correct"])} for r in records]


def _pope(records: Sequence[Row], data: Path) -> list[Row]:
    rows = []
    for r in records:
        yes, truth = r["extracted"] == "yes", r["label"] == "yes"
        rows.append(
            {
                "id": r["id"],
                "group": r["split"],
                "correct": int(r["correct"]),
                "yes": int(yes),
                "tp": int(yes and truth),
                "fp": int(yes and not truth),
                "fn": int(truth and not yes),
            }
        )
    return rows


def _mmvp_patterns(data: Path) -> dict[str, str]:
    path = data / "patterns.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _mmvp(records: Sequence[Row], data: Path) -> list[Row]:
    """One unit per question pair (Index 2k-1, 2k), right when both are, as MMVP scores it."""
    by_index = {int(r["id"]): r for r in records}
    patterns = _mmvp_patterns(data)
    rows = []
    for i in sorted(by_index):
        if i % 2 == 1 and i + 1 in by_index:
            ok = by_index[i]["correct"] and by_index[i + 1]["correct"]
            rows.append({"id": f"{i}-{i + 1}", "group": patterns.get(str(i), "all"), "correct": int(ok)})
    return rows


def _mmvp_vlm(records: Sequence[Row], data: Path) -> list[Row]:
    """One unit per image pair of a pattern, right when both statements are matched."""
    pairs: dict[tuple[str, str], list[bool]] = {}
    for r in records:
        pairs.setdefault((r["pattern"], str(r["pair"])), []).append(bool(r["correct"]))
    return [
        {"id": f"{pat}/{pair}", "group": pat, "correct": int(all(ok))} for (pat, pair), ok in pairs.items()
    ]


def _mathverse(records: Sequence[Row], data: Path) -> list[Row]:
    return [{"id": r["id"], "group": r["version"], "correct": int(r["correct"])} for r in records]


def _retrieval(records: Sequence[Row], data: Path) -> list[Row]:
    rows = []
    for r in records:
        rank = r["rank_of_first_right"]
        rows.append(
            {
                "id": r["id"],
                "group": r["direction"],
                "r1": int(rank == 1),
                "r5": int(rank is not None and rank <= 5),
            }
        )
    return rows


def _correct(records: Sequence[Row], data: Path) -> list[Row]:
    """Records that are already units: an id, an optional group and `correct`."""
    return [{"id": r["id"], "group": r.get("group", "all"), "correct": int(r["correct"])} for r in records]


UNITS: dict[str, UnitMaker] = {
    "qa": _qa,
    "pope": _pope,
    "mmvp": _mmvp,
    "mmvp_vlm": _mmvp_vlm,
    "mathverse": _mathverse,
    "retrieval": _retrieval,
    "dense_probe": _correct,
    "regions": _correct,
    "grounding": _correct,
    "refcoco": _correct,  # a referring expression through the MLLM, right at IoU >= 0.5 (acc@0.5)
    "swaps": _correct,
}


def units_for(bench: str, records: Sequence[Row], data: Path) -> list[Row]:
    if bench not in UNITS:
        raise KeyError(f"no unit maker for benchmark {bench!r}; known: {sorted(UNITS)}")
    return UNITS[bench](records, data)
