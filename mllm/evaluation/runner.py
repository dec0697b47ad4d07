"""`mllm eval`: load a benchmark in its official layout, answer it (or read answers produced
elsewhere), score it with the same scorer either way, and write metrics + per-item records.

Generation is batched and deterministic (greedy, or AGLA's calibrated greedy); the per-item records
carry the prompt, the raw response and what was extracted from it, so any score can be audited.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

import torch

from mllm.data.images import load_image
from mllm.evaluation.agla import AglaConfig
from mllm.evaluation.benchmarks import (
    get_benchmark,
    refuse_to_overwrite_inputs,
    resolve_rule,
    score_predictions_file,
    write_report,
)
from mllm.inference import answer_batch
from mllm.loading import get_loader, resolve_model_dir
from mllm.model import MultimodalLM


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def generate_responses(
    model: MultimodalLM,
    items: list,
    batch_size: int,
    max_new_tokens: int,
    decoding: str = "greedy",
    agla: AglaConfig | None = None,
) -> dict[str, str]:
    """Responses by item id. Images are opened per batch, so a large benchmark never sits in memory."""
    out: dict[str, str] = {}
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        images = [load_image(it.image) if it.image is not None else None for it in chunk]
        answers = answer_batch(
            model,
            [it.prompt for it in chunk],
            images,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            decoding=decoding,
            agla=agla,
        )
        out.update({it.id: a for it, a in zip(chunk, answers)})
    return out


def evaluate(
    model: MultimodalLM,
    bench: str,
    data: str | Path,
    options: dict[str, Any] | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    decoding: str = "greedy",
    agla: AglaConfig | None = None,
    limit: int | None = None,
) -> tuple[dict, list[dict]]:
    """Answer and score one benchmark with a model already in memory (the demo, a training loop)."""
    b = get_benchmark(bench)
    _, options = resolve_rule(b, options or {})
    items = b.load(Path(data), **options)
    if limit:
        items = items[:limit]
    responses = generate_responses(
        model, items, batch_size, max_new_tokens or b.max_new_tokens, decoding, agla
    )
    return b.score(items, responses, **options)


def evaluate_with_kind(
    b: Any,
    model_dir: str | Path,
    data: str | Path,
    options: dict[str, Any],
    batch_size: int,
    device: str,
    limit: int | None,
    meta: dict[str, Any],
) -> tuple[dict, list[dict]]:
    """A benchmark that answers through `b.respond` with a model of `b.model_kind` (e.g. MMVP-VLM with a
    ContrastiveModel): load that kind from `model_dir` (a model or run folder), respond, score."""
    path = resolve_model_dir(model_dir, b.model_kind)
    model = get_loader(b.model_kind).load(path).to(pick_device(device)).eval()
    _, options = resolve_rule(b, options)
    items = b.load(Path(data), **options)
    if limit:
        items = items[:limit]
    meta.update(model=str(path), model_kind=b.model_kind)
    return b.score(items, b.respond(model, items, batch_size=batch_size, **options), **options)


def run_eval(
    bench: str,
    data: str | Path,
    out: str | Path,
    model_dir: str | Path | None = None,
    predictions: str | Path | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    decoding: str = "greedy",
    agla: AglaConfig | None = None,
    device: str = "auto",
    dtype: str = "fp32",
    options: dict[str, Any] | None = None,
    limit: int | None = None,
) -> dict:
    """Evaluate a model (`model_dir`) or score a predictions file (`predictions`); exactly one.

    The metrics' `meta` records the scoring rule (`rule`: "mllm", or "official" where asked for) and,
    for a predictions file, the layout it was read as (`predictions_layout`)."""
    if (model_dir is None) == (predictions is None):
        raise ValueError(
            "give exactly one of --model (generate answers) or --predictions (score a predictions file)"
        )
    refuse_to_overwrite_inputs(out, [data] + ([predictions] if predictions is not None else []))
    options = dict(options or {})
    b = get_benchmark(bench)
    rule, _ = resolve_rule(b, options)  # a rule the benchmark lacks fails here, before any model loads
    meta: dict[str, Any] = {
        "benchmark": bench,
        "data": str(data),
        "decoding": decoding,
        "rule": rule,
        "options": options,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if model_dir is not None and b.respond is not None:  # scored from a non-generative model's outputs
        metrics, records = evaluate_with_kind(b, model_dir, data, options, batch_size, device, limit, meta)
    elif model_dir is not None:
        path = resolve_model_dir(model_dir)
        model = MultimodalLM.from_pretrained(path, torch_dtype=torch.bfloat16 if dtype == "bf16" else None)
        model.to(pick_device(device))
        if bench == "refcoco":  # the model's recipe declares its box coordinates; never guessed
            options.setdefault("box_format", model.meta.box_format)
            options.setdefault("pad_to_square", bool(model.meta.tower.get("pad_to_square", False)))
            meta["options"] = options
        metrics, records = evaluate(
            model, bench, data, options, batch_size, max_new_tokens, decoding, agla, limit
        )
        meta.update(model=str(path), max_new_tokens=max_new_tokens or b.max_new_tokens)
        if decoding == "agla":
            meta["agla"] = (agla or AglaConfig()).__dict__
    else:
        scored = score_predictions_file(bench, data, predictions, **options)
        metrics, records = scored.metrics, scored.records
        meta.update(predictions=str(predictions), predictions_layout=scored.layout)
    write_report(out, metrics, records, meta=meta)
    return dict(metrics, meta=meta)


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """`key=value` benchmark options; values parsed as JSON where they parse (true, 3, "x")."""
    opts: dict[str, Any] = {}
    for p in pairs:
        if "=" not in p:
            raise ValueError(f"benchmark option {p!r} is not key=value")
        k, v = p.split("=", 1)
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    return opts
