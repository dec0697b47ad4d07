"""Seeded RNG streams, the scene mix of the training world, and held-out de-duplication.

Each item gets its own `random.Random` seeded by a string naming the world seed, the split and
the item index. String seeds are hashed with SHA-512 by `random`, so streams are independent of
`PYTHONHASHSEED`, of each other, and of the order in which items are generated.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

from PIL import Image

from .mathfig import math_scene, sample_problem
from .render import render
from .scene import Scene, sample_scene


def stream(seed: int, split: str, index: int, attempt: int = 0) -> random.Random:
    """The RNG for one item of one split (`attempt` > 0 when a held-out item had to be redrawn)."""
    suffix = f":{attempt}" if attempt else ""
    return random.Random(f"geoworld:{seed}:{split}:{index}{suffix}")


def math_training_scene(rng: random.Random, size: int) -> Scene:
    """A labelled triangle with a random share of its facts drawn (none, some, or all)."""
    problem = sample_problem(rng)
    keys = [c.key for c in problem.conditions]
    mode = rng.random()
    if mode < 1 / 3:
        drawn: list[str] = []
    elif mode < 2 / 3:
        drawn = rng.sample(keys, k=rng.randint(1, len(keys)))
    else:
        drawn = keys
    return math_scene(problem, size, drawn)


def world_scene(rng: random.Random, size: int, math_frac: float = 0.1, max_shapes: int = 5) -> Scene:
    """One scene of the training mix: mostly primitives, a `math_frac` share of math figures."""
    if rng.random() < math_frac:
        return math_training_scene(rng, size)
    return sample_scene(rng, size, max_shapes=max_shapes)


def pixel_key(img: Image.Image) -> bytes:
    """Content hash of the decoded pixels (equal pixels ⇔ equal PNG bytes here)."""
    h = hashlib.sha1(f"{img.mode}{img.size}".encode())
    h.update(img.tobytes())
    return h.digest()


def fresh(
    make: Callable[[random.Random], Scene | None],
    seed: int,
    split: str,
    index: int,
    seen: set[bytes],
    tries: int = 200,
) -> tuple[Scene, Image.Image, random.Random]:
    """Draw an item whose image is not in `seen` (train and earlier held-out items), and add it.

    `make` may return None to reject a draw (e.g. the scene cannot host the wanted question).
    Redraws use a new stream per attempt, so the result stays a pure function of the seed.
    """
    for attempt in range(tries):
        rng = stream(seed, split, index, attempt)
        scene = make(rng)
        if scene is None:
            continue
        img = render(scene)
        key = pixel_key(img)
        if key not in seen:
            seen.add(key)
            return scene, img, rng
    raise RuntimeError(f"could not draw a fresh {split} item {index} in {tries} attempts")
