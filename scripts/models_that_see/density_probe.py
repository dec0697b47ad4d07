"""How well do a warmed-up tower's per-patch heads count and name, on held-out scenes?

    python scripts/models_that_see/density_probe.py MODEL_DIR WORLD_DIR [--scenes 300]

Over the first held-out primitive scenes of WORLD_DIR/eval (math figures skipped), from the anchored
projector's heads alone (`AnchoredProjector.count_maps` and the shape / colour heads; what the tower
warm-up trains):
- totals: how many scenes' summed object density rounds to their object count, and the mean |error|;
- per-patch colour and shape accuracy on the patches an object owns (mllm.data.scene_labels);
- object shape: per object, the density-weighted mean P(shape) over its patches names its shape.
docs/results.md, "Eighth round".
"""

from __future__ import annotations

import argparse
import json

import torch
from PIL import Image

from encoders.supervised import PatchTargets
from mllm.data.geoworld.vocab import COLOR_NAMES, SHAPES
from mllm.data.scene_labels import patch_labels
from mllm.model import MultimodalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("world")
    ap.add_argument("--scenes", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = MultimodalLM.from_pretrained(args.model).eval()
    proj = model.projector
    targets = PatchTargets(COLOR_NAMES, SHAPES, density=True)
    totals, errors, objects = 0, [], [0, 0]
    patches = {"colour": [0, 0], "shape": [0, 0]}
    rows = [json.loads(line) for line in open(f"{args.world}/eval/scenes.jsonl")][: args.scenes]
    for r in rows:
        scene = r["scene"]
        if scene.get("figure") is not None:
            continue
        image = Image.open(f"{args.world}/{r['image']}").convert("RGB")
        with torch.no_grad():
            x = model.tower_features(model.preprocess([image]))
            density = proj.count_maps(x)[0][0]
            heads = dict(zip(proj.words, (g[0] for g in proj.heads(x).split(proj.sizes, dim=-1))))
        want = len(scene["shapes"])
        totals += round(float(density.sum())) == want
        errors.append(abs(float(density.sum()) - want))
        label = patch_labels(scene, model.tower.grid, targets)
        for k, tally in patches.items():
            on = label[k] > 0
            tally[0] += int((heads[k].argmax(-1)[on] == label[k][on]).sum())
            tally[1] += int(on.sum())
        p_shape = heads["shape"].softmax(-1)
        for s in scene["shapes"]:
            mine = (label["shape"] == SHAPES.index(s["kind"]) + 1) & (
                label["colour"] == COLOR_NAMES.index(s["color"]) + 1
            )
            if mine.any():
                vote = (p_shape[mine] * label["density"][mine, None]).sum(0)
                objects[0] += int(vote.argmax()) == SHAPES.index(s["kind"]) + 1
                objects[1] += 1
    n = len(errors)
    print(
        f"totals {totals}/{n} (mean |error| {sum(errors) / n:.3f}); per-patch "
        + ", ".join(f"{k} {100 * a / b:.1f}%" for k, (a, b) in patches.items())
        + f"; object shape {100 * objects[0] / objects[1]:.1f}%"
    )


if __name__ == "__main__":
    main()
