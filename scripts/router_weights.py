"""What a trained SVE-Math router does with its levels: per-level routing weights and how large the routed
branch is beside the tower's tokens, on a world's held-out images.

Usage: python scripts/router_weights.py MODEL_DIR WORLD_DIR [--images N]

Why: a router comparison that comes out "no difference" could mean the router learned nothing (weights
stuck at their start, a branch still near zero) or that what it learned does not reach the measure. This
prints one JSON line per image set (the world's held-out QA scenes, `eval/`, and MathVerse's
vision-dominant figures): the mean and standard deviation over images of each level's weight (coarse to
fine; a constant router's are all 0.5) and the mean L2 norm of the routed part of each token over the mean
norm of the tower's tokens (`branch_over_tower`; 0 for a residual router at its start).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from mllm.model import MultimodalLM
from mllm.vision import RouterFusion, tower_input

SETS = {"eval": "eval/images/*.png", "mathverse-vision-dominant": "mathverse/images/*_vd.png"}


@torch.no_grad()
def router_stats(model: MultimodalLM, paths: list[Path]) -> dict[str, object]:
    if not isinstance(model.fusion, RouterFusion):
        raise SystemExit(f"{model.meta.fusion and model.meta.fusion.get('type')!r} is not a router model")
    px = model.preprocess([Image.open(p) for p in paths])
    out = model.fusion.routed(model, px)
    tower = model.tower(tower_input(model.tower, px.float())).tokens
    # residual: the routed levels are what the router added to the tower's tokens (concat keeps them apart)
    routed = out.tokens - tower if model.router.merge == "residual" else None
    stats: dict[str, object] = {
        "images": len(paths),
        "mode": model.router.mode,
        "merge": model.router.merge,
        "weight_mean": [round(x, 3) for x in out.weights.mean(0).tolist()],
        "weight_std": [round(x, 3) for x in out.weights.std(0).tolist()],
    }
    if routed is not None:
        ratio = routed.norm(dim=-1).mean() / tower.norm(dim=-1).mean()
        stats["branch_over_tower"] = round(float(ratio), 3)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("world", type=Path)
    ap.add_argument("--images", type=int, default=64, help="images per set (the first N by name)")
    args = ap.parse_args()
    model = MultimodalLM.from_pretrained(args.model).eval()
    for name, pattern in SETS.items():
        paths = sorted(args.world.glob(pattern))[: args.images]
        if not paths:
            raise SystemExit(f"{args.world}: no images match {pattern}")
        print(json.dumps({"model": str(args.model), "set": name, **router_stats(model, paths)}))


if __name__ == "__main__":
    main()
