"""Per arm and seed, the share of absent objects a model answered "yes" to on one POPE split, read from
the arms' evaluations of an `mllm evidence` run (`B/<arm>/s<seed>/eval/pope.json`).

Why: accuracy and yes-ratio mix misses with false yeses; what PRIOR and AGLA claim to cut is the false
yes, so the evidence pages state it per seed.

    python scripts/pope_false_yes.py runs/evidence/prior-weak/b2 --seeds 0 1 2 3 4 [--split adversarial]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mllm.evidence.stats import metric_value, table_from_rows


def false_yes(units: list[dict], split: str, where: str) -> float:
    """Percent of the split's absent-object questions answered yes (the evidence stack's `false_yes`
    metric, mllm.evidence.stats); an absent object is a question that can be neither a hit nor a miss."""
    rows = [u for u in units if u["group"] == split]
    if not any(not (u["tp"] or u["fn"]) for u in rows):
        raise ValueError(f"{where}: no absent-object questions in split {split!r}")
    return metric_value(table_from_rows(rows, ("tp", "fp", "fn")), "false_yes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "budget_dir", type=Path, help="an evidence run's budget folder, e.g. runs/evidence/prior-weak/b2"
    )
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--split", default="adversarial")
    args = ap.parse_args()
    arms = sorted(
        p.name
        for p in args.budget_dir.iterdir()
        if (p / f"s{args.seeds[0]}" / "eval" / "pope.json").is_file()
    )
    if not arms:
        raise SystemExit(f"{args.budget_dir}: no arm has eval/pope.json for seed {args.seeds[0]}")
    for arm in arms:
        rates = []
        for s in args.seeds:
            path = args.budget_dir / arm / f"s{s}" / "eval" / "pope.json"
            rates.append(false_yes(json.loads(path.read_text())["units"], args.split, str(path)))
        print(f"{arm}: {' / '.join(f'{r:.1f}' for r in rates)} (mean {sum(rates) / len(rates):.1f})")


if __name__ == "__main__":
    main()
