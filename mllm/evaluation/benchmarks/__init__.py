"""Benchmarks as data: one module per benchmark, each registering a `Benchmark` (load + score).

Importing this package registers every benchmark in `BENCHMARKS`: mmvp, pope, mathverse, refcoco
(grounding), qa (GeoWorld held-out QA), and, for contrastive models, mmvp_vlm and retrieval; and the
predictions layouts other tools write in `PREDICTION_LAYOUTS` (mllm, llava, lmms-eval, mathverse,
vlmevalkit). The model-free path is `score_predictions(name, data_dir, predictions_file, out.json,
**options)`; a runner that generates answers uses `get_benchmark(name)`, asks each `Item.prompt`
(adding the <image> marker) and hands the responses to `Benchmark.score` (or, where a benchmark has
`respond`, lets it answer with a model of its `model_kind`). `rule=official` picks the public scorer
where a benchmark can reproduce one offline (`Benchmark.rules`; docs/evaluation.md lists every
deviation of the default rule).
"""

from __future__ import annotations

from . import geoworld_qa, grounding, mathverse, mmvp, mmvp_vlm, pope, retrieval  # noqa: F401  (registration)
from .core import (
    BENCHMARKS,
    DEFAULT_RULE,
    Benchmark,
    BenchmarkError,
    Item,
    OptionError,
    get_benchmark,
    read_predictions,
    refuse_to_overwrite_inputs,
    register_benchmark,
    report_paths,
    resolve_rule,
    write_report,
)
from .predictions import (
    PREDICTION_LAYOUTS,
    PredictionLayout,
    ScoredFile,
    read_responses,
    register_layout,
    score_file,
    score_predictions,
    score_predictions_file,
)

__all__ = [
    "BENCHMARKS",
    "DEFAULT_RULE",
    "PREDICTION_LAYOUTS",
    "Benchmark",
    "BenchmarkError",
    "Item",
    "OptionError",
    "PredictionLayout",
    "ScoredFile",
    "get_benchmark",
    "read_predictions",
    "read_responses",
    "register_benchmark",
    "refuse_to_overwrite_inputs",
    "register_layout",
    "report_paths",
    "resolve_rule",
    "score_file",
    "score_predictions",
    "score_predictions_file",
    "write_report",
]
