"""How well can a trained model count, read from its parts rather than its answers?

    python scripts/models_that_see/count_probe.py MODEL_DIR WORLD_DIR

For each held-out count question of WORLD_DIR/eval (GeoWorld's "How many <kind>s / <colour> shapes /
shapes are there?"):
- heads: sum over patches of P(centre) x P(the named colour or shape) from the anchored projector's
  per-patch heads (what the tower warm-up trains), no other part of the model;
- counter (a readout with `count`): the readout's own n for that question, as the model computes it;
- answer: the model's greedy answer.
Prints how many of each round to the right count (docs/results.md, "Seventh round").
"""

from __future__ import annotations

import json
import re
import sys

import torch
from PIL import Image

import mllm.readout as R
from mllm.inference import answer_batch
from mllm.model import MultimodalLM


def main(model_dir: str, world: str) -> None:
    torch.set_num_threads(1)
    model = MultimodalLM.from_pretrained(model_dir).eval()
    proj = model.projector
    names = [(g, w) for g, ws in proj.words.items() for w in ws]
    counts: list[float] = []
    original = R.FocusReadout.forward

    def spy(self, features, queries, image_index, targets=None, tokens=None, centre=None):
        if self.count_q is not None:
            has = image_index >= 0
            f = self.norm(features)[image_index[has]]
            match = torch.einsum("md,mnd->mn", self.count_q(self.qnorm(queries[has])), self.count_k(f))
            p = centre[image_index[has]] if centre is not None else torch.sigmoid(self.centre(f).squeeze(-1))
            counts.append(float((torch.sigmoid(match / self.dim**0.5) * p).sum(-1)[0]))
        return original(self, features, queries, image_index, targets, tokens, centre)

    R.FocusReadout.forward = spy
    rows = [json.loads(line) for line in open(f"{world}/eval/qa.jsonl")]
    rows = [r for r in rows if r["category"] == "count"]
    right = {"heads": 0, "counter": 0, "answer": 0}
    for r in rows:
        image = Image.open(f"{world}/{r['image']}").convert("RGB")
        want = int(r["answer"])
        with torch.no_grad():
            feats = model.tower_features(model.preprocess([image]))
            groups = [g.softmax(-1) for g in proj.heads(feats).split(proj.sizes, dim=-1)]
        probs = torch.cat(groups, -1)[0]
        sel = torch.ones(probs.shape[0])
        q = r["question"].lower()
        for i, (group, word) in enumerate(names):
            if word and group in ("colour", "shape") and re.search(rf"\b{word}s?\b", q):
                sel = probs[:, i]
        right["heads"] += round(float((groups[-1][0, :, 1] * sel).sum())) == want
        counts.clear()
        answer = answer_batch(model, [r["question"]], [image], max_new_tokens=4, batch_size=1)[0]
        right["answer"] += answer.strip() == r["answer"]
        if counts:
            right["counter"] += round(counts[0]) == want
    n = len(rows)
    print(
        ", ".join(
            f"{k} {v}/{n}" for k, v in right.items() if k != "counter" or model.readout.count_q is not None
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
