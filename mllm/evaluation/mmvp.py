"""MMVP in its official layout: `Questions.csv` + `MMVP Images/<Index>.jpg`; pairs (2k-1, 2k) score
only when both answers are right."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from mllm.data.images import load_image
from mllm.evaluation.extract import extract_option, parse_options
from mllm.inference import answer_batch
from mllm.model import MultimodalLM


def read_questions(data_dir: Path) -> list[dict[str, str]]:
    path = data_dir / "Questions.csv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = {"Index", "Question", "Options", "Correct Answer"}
    if rows and not need <= set(rows[0]):
        raise ValueError(f"{path}: columns {sorted(rows[0])} lack {sorted(need - set(rows[0]))}")
    return rows


def score(rows: list[dict[str, str]], responses: dict[str, str]) -> tuple[dict[str, Any], list[dict]]:
    records = []
    for row in rows:
        opts = parse_options(row["Options"])
        resp = responses.get(row["Index"], "")
        pred = extract_option(resp, opts)
        truth = row["Correct Answer"].strip().strip("()").lower()
        records.append({"Index": row["Index"], "response": resp, "extracted": pred, "correct": pred == truth})
    by_index = {int(r["Index"]): r for r in records}
    pairs = [(i, i + 1) for i in sorted(by_index) if i % 2 == 1 and i + 1 in by_index]
    pair_ok = [by_index[a]["correct"] and by_index[b]["correct"] for a, b in pairs]
    metrics = {
        "pair_accuracy": 100.0 * sum(pair_ok) / max(1, len(pair_ok)),
        "question_accuracy": 100.0 * sum(r["correct"] for r in records) / max(1, len(records)),
        "unparsed": sum(r["extracted"] is None for r in records),
        "pairs": len(pair_ok),
    }
    return metrics, records


def evaluate_mmvp(model: MultimodalLM, data_dir: str | Path, batch_size: int = 32) -> tuple[dict[str, Any], list[dict]]:
    data_dir = Path(data_dir)
    rows = read_questions(data_dir)
    images = [load_image(data_dir / "MMVP Images" / f"{r['Index']}.jpg") for r in rows]
    prompts = [f"{r['Question']} {r['Options']}" for r in rows]
    answers = answer_batch(model, prompts, images, batch_size=batch_size)
    return score(rows, {r["Index"]: a for r, a in zip(rows, answers)})
