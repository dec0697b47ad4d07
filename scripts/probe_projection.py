"""The projection-head study: a trained contrastive pair's per-patch colour/shape linear probe, on the
features before its projection head (what a MultimodalLM and `mllm probe dense` read) and after it (the
projected, normalised embedding), one row each (mllm.evaluation.projection_probe).

Usage: python scripts/probe_projection.py MODEL_DIR_OR_RUN WORLD_DIR [--train-limit N] [--steps S] [--json]
"""

from __future__ import annotations

import argparse
import json

import torch

from mllm.evaluation.projection_probe import projection_probe
from mllm.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a contrastive model folder, or a run folder (its last finished stage)")
    ap.add_argument("world", help="a GeoWorld folder (scenes.jsonl, eval/scenes.jsonl)")
    ap.add_argument("--train-limit", type=int, default=1000, help="training scenes for the probe")
    ap.add_argument("--steps", type=int, default=300, help="probe optimisation steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model = load_model(args.model, "contrastive")
    if not hasattr(model, "encode_image"):
        raise SystemExit(f"{args.model}: not a contrastive pair (a {type(model).__name__})")
    rows = projection_probe(model, args.world, args.train_limit, args.steps, args.seed)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'space':<6} {'dim':>4} {'colour':>7} {'colour fg':>9} {'shape':>7} {'shape fg':>9}")
    for r in rows:
        print(
            f"{r['space']:<6} {r['dim']:>4} {r['colour_acc']:>7.3f} {r['colour_fg_acc']:>9.3f} "
            f"{r['shape_acc']:>7.3f} {r['shape_fg_acc']:>9.3f}"
        )


if __name__ == "__main__":
    main()
