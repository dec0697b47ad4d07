"""Where do a model's looks attend? (not project code; docs/results.md, "Fifth round")

For live GeoWorld scenes never used in training (another seed), asks each question once with the model's
own prompt format and reports, per question family: how often the looks' head-mean attention has its
arg-max on a referent patch (mllm.data.geoworld.referents), and the attention mass on the referents.

Usage: python scripts/models_that_see/look_grounding.py MODEL_DIR [N_SCENES]
"""

from __future__ import annotations

import collections
import sys

import torch

from mllm.config import LiveWorldConfig
from mllm.data.geoworld.live import qa_turns
from mllm.data.geoworld.referents import referent_patches, referents
from mllm.data.geoworld.render import render
from mllm.data.geoworld.sampling import stream, world_scene
from mllm.inference import prompt_ids
from mllm.model import MultimodalLM

CATS = [
    ("What color", "colour"),
    ("What shape", "shape"),
    ("How many", "count"),
    ("small or large", "size"),
    ("pointing", "orientation"),
    ("horizontal or vertical", "orientation"),
    ("Is there", "existence"),
    ("left", "position"),
    ("top or the bottom", "position"),
    ("above", "position"),
]


def category(q: str) -> str:
    return next((c for k, c in CATS if k in q), "other")


@torch.no_grad()
def main() -> None:
    model = MultimodalLM.from_pretrained(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    assert model.readout is not None, "the model has no readout"
    hit, mass, total = collections.Counter(), collections.Counter(), collections.Counter()
    cfg = LiveWorldConfig(turns=(8, 8), existence=0, mc_frac=0.0, paraphrase_frac=0.0)
    attn_store: dict[str, torch.Tensor] = {}
    readout = model.readout

    def grab(_m, args, _out):  # the attention the readout computed, recomputed from its inputs
        feats, queries, index = args[:3]
        f = readout.norm(feats)[index]
        q = readout.q(readout.qnorm(queries)).view(-1, readout.heads, 1, readout.dim)
        k = readout.k(f).view(f.shape[0], f.shape[1], readout.heads, readout.dim).transpose(1, 2)
        attn_store["a"] = ((q * k).sum(-1) / readout.dim**0.5).softmax(-1).mean(1)

    readout.register_forward_hook(grab)
    for i in range(n):
        rng = stream(12345, "probe", i, 0)
        scene = world_scene(rng, 64, 0.0, 5)
        if scene.figure is not None:
            continue
        pixels = model.preprocess([render(scene)])
        for q, _a in qa_turns(scene, rng, cfg):
            refs = referents(scene, q)
            if not refs:
                continue
            target = referent_patches(scene, refs, model.tower.grid)
            ids = prompt_ids(model, [("user", f"<image>\n{q}")], 1)[None]
            model.embed(ids, pixels)
            a = attn_store["a"][0]
            c = category(q)
            hit[c] += int(target[a.argmax()] > 0)
            mass[c] += float((a * target).sum())
            total[c] += 1
    for c in sorted(total):
        print(
            f"{c:12s} n={total[c]:4d}  argmax on referent {100 * hit[c] / total[c]:5.1f}%  mass {mass[c] / total[c]:.2f}"
        )
    allh = sum(hit.values()) / sum(total.values())
    print(f"{'all':12s} n={sum(total.values()):4d}  argmax on referent {100 * allh:5.1f}%")


if __name__ == "__main__":
    main()
