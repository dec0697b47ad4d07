"""Scorers never crash: hypothesis-drawn model outputs through every registered benchmark's `score`
(and so through every extractor it uses), on the official-format sets GeoWorld writes.

For every benchmark in the registry (a new one is picked up automatically and must load here), each
example gives every item a response drawn from arbitrary unicode, answer-shaped fragments (letters
in any dress, numbers, LaTeX, boxes, yes/no, the item's own truth) or nothing at all (a missing
answer). `score` must return metrics whose numbers are finite and per-item records for every item.
The predictions-file route must either score a fuzzed file or refuse it with a BenchmarkError that
names the file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mllm.data.geoworld import write_world
from mllm.evaluation.benchmarks import BENCHMARKS, BenchmarkError, score_predictions

FRAGMENTS = [
    "A",
    "B",
    "(a)",
    "(b)",
    "C.",
    "D)",
    "img1",
    "img2",
    "yes",
    "No.",
    "not",
    "Answer:",
    "The answer is ",
    "\\boxed{",
    "}",
    "\\frac{1}{2}",
    "\\sqrt{3}",
    "√2",
    "π",
    "45°",
    "1e309",
    "-0",
    "nan",
    "inf",
    "1/0",
    "[0.1, 0.2, 0.5, 0.6]",
    "[10, 20, 30, 40]",
    "(1,2),(3,4)",
    "<box>",
    "</box>",
    "[",
    "]",
    ",",
    " ",
    "\n",
    "0.999999999999",
    "123456789012345678901234567890",
    "\x00",
    "\ud7ff",
    "🙂",
    "ﬁ",
    "Ⅻ",
    "٣",
]
TEXT = st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join),
)
HUGE = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=2000, max_size=5000)
EXAMPLES = int(os.environ.get("MLLM_FUZZ_EXAMPLES", "30"))  # more: MLLM_FUZZ_EXAMPLES=500
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("geoworld")
    write_world(
        root,
        seed=0,
        n=20,
        size=64,
        n_eval=16,
        mmvp_pairs=4,
        pope_questions=12,
        refcoco_n=8,
        mathverse_problems=3,
    )
    out = {}
    for name, bench in sorted(BENCHMARKS.items()):
        for d in (root / name, root / "mmvp", root):
            try:
                out[name] = (d, bench.load(d))
                break
            except (BenchmarkError, FileNotFoundError, ValueError):
                continue
    missing = sorted(set(BENCHMARKS) - set(out))
    assert not missing, f"benchmarks with no GeoWorld set to fuzz: {missing}"
    return out


def _truths(item) -> list[str]:
    return [str(v) for k, v in item.meta.items() if k in ("answer", "label", "truth", "bbox", "text", "key")]


def _responses(data, items) -> dict[str, str]:
    out, huge = {}, None
    for it in items:
        kind = data.draw(st.sampled_from(["missing", "text", "truth", "huge"]))
        if kind == "text":
            out[it.id] = data.draw(TEXT)
        elif kind == "huge" and not huge:  # one very long answer an example: linear-time extractors
            out[it.id] = huge = data.draw(HUGE)
        elif kind == "truth" and _truths(it):
            out[it.id] = data.draw(st.sampled_from(_truths(it))) + data.draw(
                st.sampled_from(["", ".", " ", "\n?"])
            )
    return out


def _finite(x) -> bool:
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return True
    if isinstance(x, (int, float)):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_finite(v) for v in x)
    return True


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_score_never_crashes(loaded, name):
    bench = BENCHMARKS[name]
    _, items = loaded[name]

    @FUZZ
    @given(st.data())
    def run(data):
        responses = _responses(data, items)
        metrics, records = bench.score(items, responses)
        assert isinstance(metrics, dict) and _finite(metrics), metrics
        assert isinstance(records, list) and len(records) >= 1
        json.dumps(metrics)  # reports are JSON

    run()


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_predictions_file_scored_or_refused_by_name(loaded, name, tmp_path_factory):
    bench = BENCHMARKS[name]
    data_dir, items = loaded[name]
    tmp = tmp_path_factory.mktemp(f"pred-{name}")
    values = st.one_of(
        TEXT, st.none(), st.integers(), st.floats(allow_nan=True), st.lists(st.integers(), max_size=3)
    )

    @settings(
        max_examples=max(15, EXAMPLES // 2),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    @given(
        st.lists(st.tuples(st.sampled_from([it.id for it in items]), values), max_size=len(items)),
        st.sampled_from(["", "garbage line\n", '{"x": 1}\n']),
    )
    def run(rows, extra):
        path = tmp / "pred.jsonl"
        path.write_text("".join(json.dumps({bench.id_key: i, "response": v}) + "\n" for i, v in rows) + extra)
        try:
            metrics = score_predictions(name, data_dir, path, tmp / "out.json")
        except BenchmarkError as e:
            assert str(path) in str(e) or "pred.jsonl" in str(e), str(e)
            return
        assert _finite(metrics)

    run()


def test_every_scorer_is_covered():
    assert {"mmvp", "pope", "mathverse", "refcoco", "qa"} <= set(BENCHMARKS)
    assert Path(__file__).read_text().count("BENCHMARKS)") >= 2  # parametrised over the live registry
