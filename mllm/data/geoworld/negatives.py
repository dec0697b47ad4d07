"""Hard negative captions for NegCLIP: the exact caption with one fact made false.

NegCLIP (and the ARO benchmark behind it) shows that CLIP-style models read captions as bags of words;
training against captions that use the *same words* in a false arrangement forces binding. Each
negative is made by editing the scene graph and re-captioning it with `long_caption`, so it is
grammatical, uses only the world's vocabulary and is false of the image by construction:

- attribute: one object's colour or shape changed to another one ("a red circle" -> "a blue circle");
- relation: one object's placement mirrored left<->right or top<->bottom ("on the left" -> "on the right");
- order: two objects swap their shape nouns, or their colours if the shapes agree (the words stay, the
  binding changes: "a red circle and a blue square" -> "a red square and a blue circle").

A kind that the scene cannot support (relation for an object in the centre, order with one object) is
None. Math figures get an attribute negative (one marked value changed, or the figure called a square).
Everything is a pure function of the scene and the given RNG.
"""

from __future__ import annotations

import dataclasses
import random
import re

from .language import long_caption
from .scene import Scene, Shape, moved
from .vocab import COLOR_NAMES, SHAPES

NEGATIVE_KINDS: tuple[str, ...] = ("attribute", "relation", "order")
_MIRROR = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def _with(scene: Scene, shapes: list[Shape]) -> Scene:
    return dataclasses.replace(scene, shapes=shapes)


def _triples(shapes: list[Shape]) -> list[tuple[str, str, str]]:
    return [(s.kind, s.color, s.size) for s in shapes]


def _attribute(scene: Scene, rng: random.Random) -> str | None:
    w, h = scene.width, scene.height
    options = []
    for i, s in enumerate(scene.shapes):
        taken = set(_triples(scene.shapes[:i] + scene.shapes[i + 1 :]))
        options += [(i, "color", c) for c in COLOR_NAMES if c != s.color and (s.kind, c, s.size) not in taken]
        options += [(i, "kind", k) for k in SHAPES if k != s.kind and (k, s.color, s.size) not in taken]
    if not options:
        return None
    i, attr, value = rng.choice(options)
    shapes = list(scene.shapes)
    shapes[i] = moved(shapes[i], w, h, **{attr: value})
    return long_caption(_with(scene, shapes))


def _relation(scene: Scene, rng: random.Random) -> str | None:
    options = [(i, word) for i, s in enumerate(scene.shapes) for word in s.region.split() if word in _MIRROR]
    if not options:
        return None
    i, word = rng.choice(options)
    s = scene.shapes[i]
    region = " ".join(_MIRROR[t] if t == word else t for t in s.region.split())
    shapes = list(scene.shapes)
    shapes[i] = dataclasses.replace(s, region=region)  # the caption moves the object; the pixels do not
    return long_caption(_with(scene, shapes))


def _order(scene: Scene, rng: random.Random) -> str | None:
    w, h = scene.width, scene.height
    original = long_caption(scene)
    pairs = [(i, j) for i in range(len(scene.shapes)) for j in range(i + 1, len(scene.shapes))]
    rng.shuffle(pairs)
    for i, j in pairs:
        a, b = scene.shapes[i], scene.shapes[j]
        attr = "kind" if a.kind != b.kind else "color"
        if getattr(a, attr) == getattr(b, attr):
            continue
        shapes = list(scene.shapes)
        shapes[i] = moved(a, w, h, **{attr: getattr(b, attr)})
        shapes[j] = moved(b, w, h, **{attr: getattr(a, attr)})
        text = long_caption(_with(scene, shapes))
        if text != original:
            return text
    return None


def _figure_attribute(caption: str, rng: random.Random) -> str:
    numbers = list(re.finditer(r"\b\d+\b", caption))
    if numbers:
        m = rng.choice(numbers)
        value = int(m.group())
        new = value + rng.choice([d for d in (-20, -10, 10, 20) if value + d > 0])
        return caption[: m.start()] + str(new) + caption[m.end() :]
    return caption.replace("A triangle", "A square", 1)


def hard_negatives(scene: Scene, rng: random.Random) -> dict[str, str | None]:
    """{"attribute", "relation", "order"}: false captions of `scene` (None where impossible)."""
    original = long_caption(scene)
    if scene.figure is not None:
        out: dict[str, str | None] = {
            "attribute": _figure_attribute(original, rng),
            "relation": None,
            "order": None,
        }
    else:
        out = {
            "attribute": _attribute(scene, rng),
            "relation": _relation(scene, rng),
            "order": _order(scene, rng),
        }
    return {k: (v if v != original else None) for k, v in out.items()}
