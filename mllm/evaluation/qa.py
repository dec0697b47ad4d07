"""Held-out GeoWorld QA: exact match of the normalised short answer, per category."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from mllm.data.images import load_image, resolve_image
from mllm.evaluation.extract import normalise
from mllm.inference import answer_batch
from mllm.model import MultimodalLM


def evaluate_qa(model: MultimodalLM, data_dir: str | Path, qa_file: str = "eval/qa.jsonl",
                limit: int | None = None, batch_size: int = 32) -> tuple[dict[str, Any], list[dict]]:
    data_dir = Path(data_dir)
    items = [json.loads(ln) for ln in (data_dir / qa_file).read_text().splitlines() if ln.strip()]
    if limit:
        items = items[:limit]
    images = [load_image(resolve_image(data_dir, it["image"])) for it in items]
    answers = answer_batch(model, [it["question"] for it in items], images, batch_size=batch_size)
    per_cat: dict[str, list[bool]] = defaultdict(list)
    records = []
    for it, ans in zip(items, answers):
        ok = normalise(ans) == normalise(str(it["answer"]))
        per_cat[it["category"]].append(ok)
        records.append({"id": it["id"], "question": it["question"], "response": ans, "answer": it["answer"],
                        "category": it["category"], "correct": ok})
    total = [ok for v in per_cat.values() for ok in v]
    metrics = {
        "accuracy": 100.0 * sum(total) / max(1, len(total)),
        "per_category": {c: 100.0 * sum(v) / len(v) for c, v in sorted(per_cat.items())},
        "n": len(total),
    }
    return metrics, records
