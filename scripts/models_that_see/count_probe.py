"""How well can a trained model count, read from its parts rather than its answers?

    python scripts/models_that_see/count_probe.py MODEL_DIR WORLD_DIR

For each held-out count question of WORLD_DIR/eval (GeoWorld's "How many <kind>s / <colour> shapes /
shapes are there?"):
- heads: sum over patches of density x P(the named colour or shape) from the anchored projector's
  per-patch heads (what the tower warm-up trains; `AnchoredProjector.count_maps`), the word picked by
  its name in the question, no other part of the model;
- counter (a readout with `count`): the readout's own n for that question, its selector picking the words;
- answer: the model's greedy answer.
Prints how many of each round to the right count (docs/results.md, "Eighth round").
"""

from __future__ import annotations

import json
import re
import sys

import torch
from PIL import Image

from mllm.data.geoworld.vocab import PLURALS
from mllm.inference import answer_batch
from mllm.model import MultimodalLM


def main(model_dir: str, world: str) -> None:
    torch.set_num_threads(1)
    model = MultimodalLM.from_pretrained(model_dir).eval()
    proj = model.projector
    named = [w for group in proj.count_names for w in group]  # count_maps' order
    counts: list[float] = []
    counter = getattr(model.readout, "count_select", None)
    if counter is not None:  # n is the first of the counter's statistics: read it where the code is made
        import mllm.readout as R

        original = R.count_code

        def spy(n: torch.Tensor) -> torch.Tensor:
            counts.extend(n.tolist())
            return original(n)

        R.count_code = spy
    rows = [json.loads(line) for line in open(f"{world}/eval/qa.jsonl")]
    rows = [r for r in rows if r["category"] == "count"]
    right = {"heads": 0, "counter": 0, "answer": 0}
    for r in rows:
        image = Image.open(f"{world}/{r['image']}").convert("RGB")
        want = int(r["answer"])
        with torch.no_grad():
            density, groups = proj.count_maps(model.tower_features(model.preprocess([image])))
        words = torch.cat(groups, -1)
        sel = torch.ones_like(density[0])
        q = r["question"].lower()
        for i, word in enumerate(named):
            if re.search(rf"\b({word}|{PLURALS.get(word, word)})\b", q):
                sel = words[0, :, i]
        right["heads"] += round(float((density[0] * sel).sum())) == want
        counts.clear()
        answer = answer_batch(model, [r["question"]], [image], max_new_tokens=4, batch_size=1)[0]
        right["answer"] += answer.strip() == r["answer"]
        if counts:
            right["counter"] += round(counts[0]) == want
    n = len(rows)
    print(", ".join(f"{k} {v}/{n}" for k, v in right.items() if k != "counter" or counter is not None))


if __name__ == "__main__":
    main(*sys.argv[1:3])
