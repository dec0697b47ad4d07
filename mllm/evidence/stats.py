"""Paired differences with bootstrap intervals over items and seeds, and the verdict they support.

Why a bootstrap over both: the seed claims are compared on a few hundred held-out items per seed and
three or more seeds. Resampling items alone ignores how much a second training run moves the figure
(often more than the items do); resampling seeds alone, with three seeds, gives an interval from three
numbers. Each bootstrap draw therefore picks seeds with replacement and, inside each picked seed, items
with replacement, the *same* items for both arms (the arms answered the same held-out set), and takes
the mean over the picked seeds of (arm - reference).

Every metric here is a ratio of sums over items (accuracy = correct / n, F1 = 2 tp / (2 tp + fp + fn),
yes-ratio = yes / n, R@1 = hits / queries), so a draw is a multinomial weight vector per seed and a
metric is a function of weighted column sums: thousands of draws cost a matrix product.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: A metric: per-draw column sums {column: [draws]} -> the metric per draw (percent).
Reducer = Callable[[Mapping[str, np.ndarray]], np.ndarray]


def _ratio(num: str, den: str | None = None) -> Reducer:
    def f(s: Mapping[str, np.ndarray]) -> np.ndarray:
        d = s[den] if den else s["n"]
        return 100.0 * np.divide(s[num], d, out=np.zeros_like(s[num], dtype=float), where=d > 0)

    return f


def _f1(s: Mapping[str, np.ndarray]) -> np.ndarray:
    den = 2 * s["tp"] + s["fp"] + s["fn"]
    return 100.0 * np.divide(2 * s["tp"], den, out=np.zeros_like(den, dtype=float), where=den > 0)


def _false_yes(s: Mapping[str, np.ndarray]) -> np.ndarray:
    """POPE's false yeses over its absent objects (the items that can be neither a hit nor a miss): what a
    hallucination method claims to cut, which accuracy and yes-ratio mix with misses."""
    absent = s["n"] - s["tp"] - s["fn"]
    return 100.0 * np.divide(s["fp"], absent, out=np.zeros_like(absent, dtype=float), where=absent > 0)


#: How each metric is made from an item table's columns (every table has "n", one per item).
REDUCERS: dict[str, Reducer] = {
    "accuracy": _ratio("correct"),
    "f1": _f1,
    "yes_ratio": _ratio("yes"),
    "false_yes": _false_yes,
    "R@1": _ratio("r1"),
    "R@5": _ratio("r5"),
}


@dataclass(frozen=True)
class Table:
    """One arm's items on one seed: an id per item and numeric columns (each [items])."""

    ids: tuple[str, ...]
    columns: Mapping[str, np.ndarray]

    def select(self, mask: np.ndarray) -> Table:
        return Table(
            tuple(i for i, m in zip(self.ids, mask, strict=True) if m),
            {k: v[mask] for k, v in self.columns.items()},
        )

    def aligned(self, ids: Sequence[str]) -> Table:
        """This table's rows in the order of `ids`; an id missing on either side is an error, because a
        paired comparison of unequal item sets would compare different questions."""
        where = {i: k for k, i in enumerate(self.ids)}
        missing = [i for i in ids if i not in where]
        extra = len(self.ids) - (len(ids) - len(missing))
        if missing or extra:
            raise ValueError(
                f"the arms answered different items: {len(missing)} missing here (e.g. {missing[:3]}), "
                f"{extra} here and not in the reference"
            )
        order = np.array([where[i] for i in ids], dtype=int)
        return Table(tuple(ids), {k: v[order] for k, v in self.columns.items()})


def table_from_rows(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> Table:
    """A Table from per-item dicts with an "id" and the named numeric columns ("n" is added)."""
    ids = tuple(str(r["id"]) for r in rows)
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate item ids in one arm's results")
    cols = {c: np.array([float(r[c]) for r in rows], dtype=float) for c in columns}
    cols["n"] = np.ones(len(ids))
    return Table(ids, cols)


def metric_value(table: Table, metric: str) -> float:
    sums = {k: np.array([v.sum()]) for k, v in table.columns.items()}
    return float(REDUCERS[metric](sums)[0])


@dataclass(frozen=True)
class Interval:
    """The paired difference (arm - reference, mean over seeds, in points) and its 95% interval."""

    diff: float
    low: float
    high: float
    seeds: int
    items: int
    draws: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "diff": self.diff,
            "low": self.low,
            "high": self.high,
            "seeds": self.seeds,
            "items": self.items,
            "draws": self.draws,
        }


def paired_bootstrap(
    reference: Sequence[Table],
    arm: Sequence[Table],
    metric: str,
    draws: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """The difference arm - reference in `metric`, averaged over seeds, with a percentile interval
    from resampling seeds and, within each, items (the same items for both arms)."""
    if len(reference) != len(arm) or not reference:
        raise ValueError(f"need the same seeds for both arms (got {len(reference)} and {len(arm)})")
    reduce = REDUCERS[metric]
    rng = np.random.default_rng(seed)
    k = len(reference)
    per_seed = np.empty((k, draws))
    point = []
    n_items = 0
    for s, (ref, alt) in enumerate(zip(reference, arm, strict=True)):
        alt = alt.aligned(ref.ids)
        n = len(ref.ids)
        if n == 0:
            raise ValueError("an arm answered no items")
        n_items += n
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=draws).astype(float)  # [draws, n]
        d_ref = reduce({c: weights @ v for c, v in ref.columns.items()})
        d_alt = reduce({c: weights @ v for c, v in alt.columns.items()})
        per_seed[s] = d_alt - d_ref
        point.append(metric_value(alt, metric) - metric_value(ref, metric))
    picks = rng.integers(0, k, size=(draws, k))  # seeds with replacement, per draw
    boot = per_seed[picks, np.arange(draws)[:, None]].mean(1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    return Interval(float(np.mean(point)), float(low), float(high), k, n_items, draws)


def bootstrap_mean(
    tables: Sequence[Table], metric: str, draws: int = 2000, seed: int = 0, level: float = 0.95
) -> Interval:
    """One arm's `metric`, averaged over seeds, with the same items-and-seeds percentile interval."""
    if not tables:
        raise ValueError("no seeds")
    reduce = REDUCERS[metric]
    rng = np.random.default_rng(seed)
    k = len(tables)
    per_seed = np.empty((k, draws))
    for s, t in enumerate(tables):
        n = len(t.ids)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=draws).astype(float)
        per_seed[s] = reduce({c: weights @ v for c, v in t.columns.items()})
    picks = rng.integers(0, k, size=(draws, k))
    boot = per_seed[picks, np.arange(draws)[:, None]].mean(1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    point = float(np.mean([metric_value(t, metric) for t in tables]))
    return Interval(point, float(low), float(high), k, sum(len(t.ids) for t in tables), draws)


REPRODUCES = "reproduces"
OPPOSITE = "opposite"
UNRESOLVED = "not resolved at this budget"
UNDIRECTED = "no direction claimed"


def verdict(interval: Interval, expect: int) -> str:
    """`expect` is +1 where the claim says the arm is higher, -1 where lower, 0 where it says neither. An interval that excludes
    zero on the claimed side reproduces the claim, on the other side contradicts it; one that spans zero
    cannot tell at this budget (it does not show the arms equal either)."""
    if expect == 0:
        return UNDIRECTED
    if expect not in (1, -1):
        raise ValueError(f"expect must be +1, -1 or 0, got {expect}")
    if interval.low > 0:
        return REPRODUCES if expect > 0 else OPPOSITE
    if interval.high < 0:
        return REPRODUCES if expect < 0 else OPPOSITE
    return UNRESOLVED
