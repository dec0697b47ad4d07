"""RefCOCO-style referring expressions with pixel boxes (`refcoco/`).

One expression per image: a phrase that names exactly one object ("the red circle", "the small
triangle on the left"), chosen at random among the unique phrases `language.refer_all` finds, so
the set mixes minimal and over-specified expressions as human annotations do. `bbox` is the tight
[x1, y1, x2, y2] pixel box (x2/y2 exclusive); `image` is a file name inside `refcoco/images/`.
`scenes.jsonl` is a side file (not official) with each image's scene graph and target index.
"""

from __future__ import annotations

from pathlib import Path

from .files import write_jsonl
from .language import refer_all
from .render import save_png
from .sampling import fresh
from .scene import Scene, sample_scene


def write_refcoco(
    out: Path, seed: int, count: int, size: int, seen: set[bytes], max_shapes: int
) -> list[dict]:
    root = out / "refcoco"
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows, scenes = [], []
    for i in range(count):
        picked: dict[str, object] = {}

        def make(rng, picked=picked) -> Scene | None:
            scene = sample_scene(rng, size, min_shapes=2, max_shapes=max(2, max_shapes))
            index = rng.randrange(len(scene.shapes))
            phrases = refer_all(scene, index)
            if not phrases:
                return None
            picked.update(index=index, sentence=rng.choice(phrases))
            return scene

        scene, img, _ = fresh(make, seed, "refcoco", i, seen)
        name = f"{i:06d}.png"
        save_png(img, root / "images" / name)
        target = scene.shapes[int(picked["index"])]  # type: ignore[arg-type]
        rows.append(
            {
                "id": f"refcoco-{i:06d}",
                "image": name,
                "width": scene.width,
                "height": scene.height,
                "sentence": picked["sentence"],
                "bbox": list(target.box),
            }
        )
        scenes.append(
            {"id": f"refcoco-{i:06d}", "image": name, "target": picked["index"], "scene": scene.to_dict()}
        )
    write_jsonl(root / "refcoco_val.jsonl", rows)
    write_jsonl(root / "scenes.jsonl", scenes)
    return rows
