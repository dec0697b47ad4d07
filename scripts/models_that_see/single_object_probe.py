"""One-object probe: does a model read colour, shape, size, count and position from the image?

120 fresh GeoWorld scenes with K objects (default 1), each asked GeoWorld's own first question of
each category, and again with a blank white image in place of the picture: the gap is what the model
reads from pixels (docs/results.md, "Models that see").

Usage: python scripts/models_that_see/single_object_probe.py MODEL [K]
TRAINBN=1 runs a BatchNorm tower in training mode (a check that eval-mode statistics are not the cause).
"""

from __future__ import annotations

import collections
import os
import random
import sys

import torch
from PIL import Image

from mllm.data.geoworld.language import qa_pool
from mllm.data.geoworld.render import render
from mllm.data.geoworld.scene import sample_scene
from mllm.inference import answer_batch
from mllm.model import MultimodalLM

CATEGORIES = ("colour", "shape", "size", "count", "position")


def main() -> None:
    torch.set_num_threads(1)
    model = MultimodalLM.from_pretrained(sys.argv[1]).eval()
    if os.environ.get("TRAINBN"):
        model.tower.model.train()
    k = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    questions, images, answers, cats = [], [], [], []
    for i in range(120):
        rng = random.Random(f"probe{i}")
        scene = sample_scene(rng, 64, min_shapes=k, max_shapes=k)
        pool = qa_pool(scene, rng)
        for c in CATEGORIES:
            if pool[c]:
                q, a = pool[c][0]
                questions.append(q)
                images.append(render(scene))
                answers.append(a)
                cats.append(c)
    seen = answer_batch(model, questions, images, max_new_tokens=4, batch_size=64)
    blank = answer_batch(
        model,
        questions,
        [Image.new("RGB", (64, 64), "white")] * len(questions),
        max_new_tokens=4,
        batch_size=64,
    )
    right: dict[str, list[bool]] = collections.defaultdict(list)
    right_blank: dict[str, list[bool]] = collections.defaultdict(list)
    for out, out_blank, a, c in zip(seen, blank, answers, cats):
        right[c].append(out.strip() == a)
        right_blank[c].append(out_blank.strip() == a)
    for c in right:
        n = len(right[c])
        print(f"{c}: {sum(right[c]) / n:.3f} (blank image {sum(right_blank[c]) / n:.3f}, n={n})")


if __name__ == "__main__":
    main()
