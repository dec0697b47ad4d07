"""LLaVA-1.5's grounding wording: the referring prompt and the box answer in 0-1 of the image.

One place for both sides of the same exchange: a model trained on GeoWorld's live grounding turns
(`data.live.grounding`) is asked and answers exactly as the RefCOCO benchmark asks and reads it
(`mllm.evaluation.benchmarks.grounding`, box_format "norm1"), so a score measures grounding, not a
wording the model never saw.
"""

from __future__ import annotations

from collections.abc import Sequence

PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {sentence}"


def box_answer(box: Sequence[float], width: float, height: float) -> str:
    """`[x1, y1, x2, y2]` in pixels -> LLaVA-1.5's answer, "[0.22, 0.13, 0.53, 0.44]" (two decimals, 0-1)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    x1, y1, x2, y2 = box
    norm = (x1 / width, y1 / height, x2 / width, y2 / height)
    return "[" + ", ".join(f"{min(max(v, 0.0), 1.0):.2f}" for v in norm) + "]"
