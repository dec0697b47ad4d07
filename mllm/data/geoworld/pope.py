"""POPE-style object-hallucination probes in the official JSONL layout.

Objects are "colour shape" phrases ("red circle"; 8 × 8 = 64 objects). Every image gets three
present ("yes") and three absent ("no") objects, interleaved yes/no as in the official files; the
three splits share images and "yes" questions and differ in how negatives are chosen:

- random: absent objects drawn uniformly;
- popular: the absent objects most frequent in the training world;
- adversarial: the absent objects that co-occur most often in training with the objects present
  (the world's themes make these mostly "same shape, other colour" / "same colour, other shape").

Files (under `pope/`): `images/*.png`, `geoworld_pope_{random,popular,adversarial}.json`, which are
JSONL despite the name (as the official files are): {"question_id", "image", "text", "label"}.
Text is "Is there a {obj} in the image?" with the article corrected ("an orange star").
`scenes.jsonl` is a side file (not official) with each image's scene graph.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from .files import write_jsonl
from .render import save_png
from .sampling import fresh, stream
from .scene import Scene, sample_scene
from .vocab import COLOR_NAMES, SHAPES, with_article

SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
PER_IMAGE = 3  # yes questions (and as many no questions) per image
OBJECTS: tuple[str, ...] = tuple(f"{c} {k}" for k in SHAPES for c in COLOR_NAMES)


def object_stats(object_sets: Iterable[set[str]]) -> tuple[Counter[str], Counter[tuple[str, str]]]:
    """Frequency of each object and co-occurrence of each ordered pair over a set of scenes."""
    freq: Counter[str] = Counter()
    cooc: Counter[tuple[str, str]] = Counter()
    for objs in object_sets:
        freq.update(objs)
        for a in objs:
            for b in objs:
                if a != b:
                    cooc[(a, b)] += 1
    return freq, cooc


def negatives(
    split: str,
    present: set[str],
    k: int,
    freq: Counter[str],
    cooc: Counter[tuple[str, str]],
    rng: random.Random,
) -> list[str]:
    """The `k` absent objects a split probes for one image."""
    absent = [o for o in OBJECTS if o not in present]
    if split == "random":
        return rng.sample(absent, k)
    if split == "popular":
        return sorted(absent, key=lambda o: (-freq[o], OBJECTS.index(o)))[:k]
    if split == "adversarial":
        return sorted(
            absent, key=lambda o: (-sum(cooc[(p, o)] for p in present), -freq[o], OBJECTS.index(o))
        )[:k]
    raise ValueError(f"unknown POPE split {split!r}")


def question(obj: str) -> str:
    return f"Is there {with_article(obj)} in the image?"


def write_pope(
    out: Path,
    seed: int,
    questions: int,
    size: int,
    seen: set[bytes],
    train_objects: list[set[str]],
    max_shapes: int,
) -> dict[str, list[dict]]:
    """Write POPE; `questions` per split is rounded to a multiple of 6 (3 yes + 3 no per image)."""
    root = out / "pope"
    (root / "images").mkdir(parents=True, exist_ok=True)
    freq, cooc = object_stats(train_objects)
    n_images = max(1, round(questions / (2 * PER_IMAGE)))

    def make(rng) -> Scene | None:
        scene = sample_scene(rng, size, min_shapes=PER_IMAGE, max_shapes=max(PER_IMAGE, max_shapes))
        return scene if len(scene.objects()) >= PER_IMAGE else None

    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    scenes = []
    for i in range(n_images):
        scene, img, rng = fresh(make, seed, "pope", i, seen)
        name = f"{i:06d}.png"
        save_png(img, root / "images" / name)
        scenes.append({"image": name, "scene": scene.to_dict()})
        present = scene.objects()
        yes = rng.sample(sorted(present, key=OBJECTS.index), PER_IMAGE)
        for split in SPLITS:
            no = negatives(split, present, PER_IMAGE, freq, cooc, stream(seed, f"pope-{split}", i))
            for y, n in zip(yes, no):
                for obj, label in ((y, "yes"), (n, "no")):
                    rows[split].append(
                        {
                            "question_id": len(rows[split]) + 1,
                            "image": name,
                            "text": question(obj),
                            "label": label,
                        }
                    )
    for split in SPLITS:
        write_jsonl(root / f"geoworld_pope_{split}.json", rows[split])
    write_jsonl(root / "scenes.jsonl", scenes)
    return rows
