"""The held-out QA split (`eval/`): single-turn questions, exactly balanced over categories.

Item i asks a question of category CATEGORIES[i % 8] about a freshly drawn scene that can host
one (yes/no and small/large answers alternate, so those categories are exactly 50/50). Scenes
come from their own RNG stream and any image identical to one already written (train included)
is redrawn, so the split shares no image with training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import write_jsonl
from .language import QA, pick_qa, qa_pool
from .render import save_png
from .sampling import fresh, math_training_scene
from .scene import Scene, sample_scene
from .vocab import CATEGORIES

#: Binary categories alternate their answer item by item, so chance is exactly 50% there.
ALTERNATE: dict[str, tuple[str, str]] = {"existence": ("yes", "no"), "size": ("small", "large")}


def default_n_eval(n: int) -> int:
    """n // 5, at least 10 per category, rounded up to a multiple of the category count."""
    k = len(CATEGORIES)
    want = max(10 * k, n // 5)
    return -(-want // k) * k


def write_eval(out: Path, seed: int, n_eval: int, size: int, seen: set[bytes], max_shapes: int) -> list[dict]:
    """Write eval/images/*.png, eval/qa.jsonl and eval/scenes.jsonl; return the QA rows."""
    img_dir = out / "eval" / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    scenes: list[dict[str, Any]] = []
    for i in range(n_eval):
        cat = CATEGORIES[i % len(CATEGORIES)]
        chosen: dict[str, QA] = {}

        want = ALTERNATE[cat][(i // len(CATEGORIES)) % 2] if cat in ALTERNATE else None

        def make(rng, cat=cat, chosen=chosen, want=want) -> Scene | None:
            scene = (
                math_training_scene(rng, size)
                if cat == "math"
                else sample_scene(rng, size, max_shapes=max_shapes)
            )
            pool = [qa for qa in qa_pool(scene, rng)[cat] if want is None or qa[1] == want]
            if not pool:
                return None
            chosen["qa"] = pick_qa(pool, rng)
            return scene

        scene, img, _ = fresh(make, seed, "eval", i, seen)
        name = f"eval/images/{i:06d}.png"
        save_png(img, out / name)
        question, answer = chosen["qa"]
        ident = f"eval-{i:06d}"
        rows.append({"id": ident, "image": name, "question": question, "answer": answer, "category": cat})
        scenes.append({"id": ident, "image": name, "scene": scene.to_dict()})
    write_jsonl(out / "eval" / "qa.jsonl", rows)
    write_jsonl(out / "eval" / "scenes.jsonl", scenes)
    return rows
