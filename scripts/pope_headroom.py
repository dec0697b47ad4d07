"""Is there a POPE-style set the seeing demo does not saturate? Scores a model on its world's POPE and on
two harder variants written beside it, greedy and with AGLA, so a hallucination claim (AGLA, PRIOR) can be
judged on where the model's errors are, not on a set it answers at 99%.

Variants (written under OUT/<seed>/, POPE's official layout, 3 yes and 3 no questions per image):
- world:   the world's own pope/ (random, popular, adversarial), as the evidence runs score it;
- crowded: scenes of 5-8 objects (the 64 px canvas fits about 6), the training world's most; the
           "adversarial" file holds *binding* negatives: a present colour on a present shape that is not
           drawn in that colour ("red circle" beside a red square and a blue circle), the hallucination a
           model that binds colour to shape loosely makes;
- mosaic:  2 x 2 tiles of ordinary scenes (1-3 objects each) in a 128 px image the model sees at its own
           64 px, so every object is drawn at half size: crowded scenes of small objects.

Each variant's items come from their own seeded streams (`geoworld:<seed>:headroom-*`), never the
world's; nothing here trains. Usage:
    python scripts/pope_headroom.py --bases runs/evidence/base --seeds 0 1 2 --out runs/evidence/headroom
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image

from mllm.data.geoworld.files import write_jsonl
from mllm.data.geoworld.pope import OBJECTS, question
from mllm.data.geoworld.render import render
from mllm.data.geoworld.sampling import stream
from mllm.data.geoworld.scene import Scene, sample_scene
from mllm.evaluation.agla import AglaConfig
from mllm.evaluation.runner import evaluate
from mllm.model import MultimodalLM

PER_IMAGE = 3


def _binding_candidates(present: set[str]) -> list[str]:
    """Absent objects made of a present colour and a present shape."""
    colours = {o.split(" ", 1)[0] for o in present}
    kinds = {o.split(" ", 1)[1] for o in present}
    return sorted(f"{c} {s}" for c in colours for s in kinds if f"{c} {s}" not in present)


def binding_negatives(present: set[str], k: int, rng: random.Random) -> list[str]:
    """`k` of the absent objects made of a present colour and a present shape."""
    return rng.sample(_binding_candidates(present), k)


def _bindable(present: set[str]) -> bool:
    return len(_binding_candidates(present)) >= PER_IMAGE


def _crowded(seed: int, i: int) -> tuple[Image.Image, set[str]]:
    for attempt in range(100):
        scene = sample_scene(stream(seed, "headroom-crowded", i, attempt), 64, min_shapes=5, max_shapes=8)
        if _bindable(scene.objects()):
            return render(scene), scene.objects()
    raise RuntimeError(f"crowded image {i}: no scene with {PER_IMAGE} binding negatives in 100 draws")


def _mosaic(seed: int, i: int) -> tuple[Image.Image, set[str]]:
    for attempt in range(100):
        rng = stream(seed, "headroom-mosaic", i, attempt)
        tiles: list[Scene] = [sample_scene(rng, 64, min_shapes=1, max_shapes=3) for _ in range(4)]
        present = set().union(*(s.objects() for s in tiles))
        if _bindable(present):
            img = Image.new("RGB", (128, 128))
            for t, scene in enumerate(tiles):
                img.paste(render(scene).convert("RGB"), ((t % 2) * 64, (t // 2) * 64))
            return img, present
    raise RuntimeError(f"mosaic image {i}: no tiles with {PER_IMAGE} binding negatives in 100 draws")


def write_variant(root: Path, seed: int, images: int, draw) -> Path:
    """POPE files: "random" (absent objects drawn uniformly) and "adversarial" (binding negatives)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {"random": [], "adversarial": []}
    for i in range(images):
        img, present = draw(seed, i)
        name = f"{i:06d}.png"
        img.save(root / "images" / name)
        rng = stream(seed, f"headroom-questions-{root.name}", i)
        yes = rng.sample(sorted(present, key=OBJECTS.index), PER_IMAGE)
        negs = {
            "random": rng.sample([o for o in OBJECTS if o not in present], PER_IMAGE),
            "adversarial": binding_negatives(present, PER_IMAGE, rng),
        }
        for split, no in negs.items():
            for y, n in zip(yes, no):
                for obj, label in ((y, "yes"), (n, "no")):
                    q = {
                        "question_id": len(rows[split]) + 1,
                        "image": name,
                        "text": question(obj),
                        "label": label,
                    }
                    rows[split].append(q)
    for split, r in rows.items():
        write_jsonl(root / f"geoworld_pope_{split}.json", r)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bases", required=True, help="the evidence bases (BASES/s<seed>/ = mllm demo)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=100, help="images per variant (6 questions each per split)")
    args = ap.parse_args()
    out = Path(args.out)
    results: dict[str, dict] = {}
    for seed in args.seeds:
        base = Path(args.bases) / f"s{seed}"
        model = MultimodalLM.from_pretrained(base / "run" / "instruct" / "final").eval()
        sets = {
            "world": base / "world" / "pope",
            "crowded": write_variant(out / f"s{seed}" / "crowded", seed, args.images, _crowded),
            "mosaic": write_variant(out / f"s{seed}" / "mosaic", seed, args.images, _mosaic),
        }
        for variant, data in sets.items():
            for decoding in ("greedy", "agla"):
                agla = AglaConfig() if decoding == "agla" else None
                metrics, _ = evaluate(model, "pope", data, batch_size=32, decoding=decoding, agla=agla)
                row = {
                    split: {k: round(m[k], 1) for k in ("accuracy", "f1", "yes_ratio")}
                    for split, m in metrics.items()
                    if isinstance(m, dict) and "accuracy" in m
                }
                results[f"s{seed}/{variant}/{decoding}"] = row
                print(f"s{seed} {variant:8s} {decoding:6s} {json.dumps(row)}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
