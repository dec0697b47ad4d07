"""Accuracy of a trained model on hand-drawn pictures GeoWorld's renderer never made ("Models that see", item 3).

Usage: python scripts/handdrawn_eval.py MODEL_OR_RUN_DIR [--seed N] [--device auto|cpu|cuda] [--batch-size B]
                                        [--bf16] [--wrong] [--save-images DIR]

The pictures and questions come from tests/handdrawn.py (224-px anti-aliased drawings in shades near the
named colours, off GeoWorld's grid, asked in GeoWorld's phrasing); scoring is GeoWorld's QA scoring. Prints one
JSON object: {"model", "seed", "cases", "accuracy", "per_category", "n", "bar", "passes"} (`passes`: every
category ≥ the 0.9 bar that tests/test_handdrawn.py holds a model to), plus "wrong" with --wrong.
--save-images writes the pictures as PNG (NNN_category.png) with questions.jsonl, to look at them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

# The cases live with the tests (tests/handdrawn.py, not part of the package): load that one file by path,
# without putting tests/ on sys.path.
_spec = importlib.util.spec_from_file_location(
    "handdrawn", Path(__file__).resolve().parents[1] / "tests" / "handdrawn.py"
)
handdrawn = importlib.util.module_from_spec(_spec)
sys.modules["handdrawn"] = handdrawn  # its dataclasses look their module up while being defined
_spec.loader.exec_module(handdrawn)
evaluate, handdrawn_cases = handdrawn.evaluate, handdrawn.handdrawn_cases

BAR = 0.9


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a MultimodalLM folder (mllm.json) or a finished run folder (run.json)")
    ap.add_argument("--seed", type=int, default=0, help="which hand-drawn set (the tests use 0)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--bf16", action="store_true", help="load the model in bfloat16")
    ap.add_argument("--wrong", action="store_true", help="include every wrong answer in the output")
    ap.add_argument("--save-images", type=Path, default=None, metavar="DIR")
    args = ap.parse_args(argv)

    cases = handdrawn_cases(args.seed)
    if args.save_images is not None:
        args.save_images.mkdir(parents=True, exist_ok=True)
        with (args.save_images / "questions.jsonl").open("w") as f:
            for i, c in enumerate(cases):
                name = f"{i:03d}_{c.category}.png"
                c.image.save(args.save_images / name)
                f.write(
                    json.dumps(
                        {"image": name, "question": c.question, "answer": c.answer, "category": c.category}
                    )
                    + "\n"
                )

    import torch

    from mllm.evaluation.runner import pick_device
    from mllm.model import MultimodalLM
    from mllm.training.runner import resolve_model_dir

    path = resolve_model_dir(args.model)
    model = MultimodalLM.from_pretrained(path, torch_dtype=torch.bfloat16 if args.bf16 else None)
    model.to(pick_device(args.device))
    result = evaluate(model, cases, batch_size=args.batch_size)
    out = {
        "model": str(path),
        "seed": args.seed,
        "cases": len(cases),
        "accuracy": round(result["accuracy"], 4),
        "per_category": {c: round(a, 4) for c, a in result["per_category"].items()},
        "n": result["n"],
        "bar": BAR,
        "passes": all(a >= BAR for a in result["per_category"].values()),
    }
    if args.wrong:
        out["wrong"] = result["wrong"]
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
