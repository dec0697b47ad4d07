"""Benchmarks as data: one module per benchmark, each registering a `Benchmark` (load + score).

Importing this package registers every benchmark in `BENCHMARKS`: mmvp, pope, mathverse, refcoco
(grounding), qa (GeoWorld held-out QA), and, for contrastive models, mmvp_vlm and retrieval. The
model-free path is `score_predictions(name, data_dir, predictions.jsonl, out.json, **options)`; a
runner that generates answers uses `get_benchmark(name)`, asks each `Item.prompt` (adding the <image>
marker) and hands the responses to `Benchmark.score` (or, where a benchmark has `respond`, lets it
answer with a model of its `model_kind`).
"""

from __future__ import annotations

from . import geoworld_qa, grounding, mathverse, mmvp, mmvp_vlm, pope, retrieval  # noqa: F401  (registration)
from .core import (
    BENCHMARKS,
    Benchmark,
    BenchmarkError,
    Item,
    get_benchmark,
    read_predictions,
    register_benchmark,
    score_file,
    score_predictions,
    write_report,
)

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkError",
    "Item",
    "get_benchmark",
    "read_predictions",
    "register_benchmark",
    "score_file",
    "score_predictions",
    "write_report",
]
