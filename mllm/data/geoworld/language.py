"""Everything GeoWorld says about a scene: referring phrases, captions and question/answer pairs.

Questions are generated only where the scene makes them unambiguous: the object asked about is
named by a phrase that matches exactly one object (`refer`), and position questions are asked only
when the object is clearly off the midline. Answers are canonical (lowercase word or integer, no
punctuation) so a model can be scored by exact match.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import cache
from itertools import combinations

from .mathfig import conditions_sentence, stated
from .scene import Scene, Shape, in_region
from .vocab import (
    CATEGORIES,
    COLOR_NAMES,
    DIRECTIONS,
    LIES,
    LYING,
    NUMBER_WORDS,
    PLURALS,
    POINTING,
    REGION_PHRASES,
    SHAPES,
    SIZES,
    with_article,
)

QA = tuple[str, str]  # (question, answer)

#: LLaVA-like captioning prompts for the alignment stage (kept few: a small vocabulary).
ALIGN_PROMPTS: tuple[str, ...] = (
    "Describe the image briefly.",
    "Give a short description of the image.",
    "Summarize the visual content of the image.",
    "Provide a brief description of the given image.",
    "Describe the shapes in the image.",
    "What is shown in the image?",
)

_ROW = {"top": 0, "bottom": 2}


# ------------------------------------------------------------------------------------ referring phrases

_ATTRS = ("color", "size", "kind")


def _phrase(t: Shape, attrs: tuple[str, ...]) -> str:
    words = [getattr(t, a) for a in ("size", "color") if a in attrs]
    words.append(t.kind if "kind" in attrs else "object")
    return "the " + " ".join(words)


@cache
def _combos(exclude: frozenset[str]) -> tuple[tuple[str, ...], ...]:
    """Attribute subsets to try, shortest first; the noun (kind) is always used when allowed."""
    usable = tuple(a for a in _ATTRS if a not in exclude)
    return tuple(
        combo
        for r in range(len(usable) + 1)
        for combo in combinations(usable, r)
        if "kind" not in usable or "kind" in combo
    )


def _iter_refs(scene: Scene, index: int, exclude: frozenset[str], allow_position: bool) -> Iterator[str]:
    target = scene.shapes[index]
    for combo in _combos(exclude):
        key = tuple(getattr(target, a) for a in combo)
        same = [s for s in scene.shapes if tuple(getattr(s, a) for a in combo) == key]
        if len(same) == 1:
            yield _phrase(target, combo)
        elif allow_position and sum(in_region(s.region, target.region) for s in same) == 1:
            yield _phrase(target, combo) + " " + REGION_PHRASES[target.region]


def refer_all(
    scene: Scene, index: int, exclude: frozenset[str] = frozenset(), allow_position: bool = True
) -> list[str]:
    """Every phrase (shortest first) that names exactly object `index` without using `exclude`.

    Attribute phrases ("the red circle") come from subsets of colour/size/kind; a region
    ("the circle on the left") is appended only when it makes the match unique, read the way a
    person reads it: "on the left" also covers the top-left and bottom-left cells (`in_region`).
    """
    return list(_iter_refs(scene, index, exclude, allow_position))


def refer(
    scene: Scene, index: int, exclude: frozenset[str] = frozenset(), allow_position: bool = True
) -> str | None:
    """The shortest unique phrase for object `index`, or None when the scene admits none."""
    return next(_iter_refs(scene, index, exclude, allow_position), None)


def region_phrase(scene: Scene, index: int) -> str | None:
    """The phrase used with a region box: the full attribute phrase ("the small blue triangle"),
    falling back to a positional one when two objects share all attributes (never, in sampled
    scenes)."""
    target = scene.shapes[index]
    full = _phrase(target, _ATTRS)
    if sum((s.color, s.size, s.kind) == (target.color, target.size, target.kind) for s in scene.shapes) == 1:
        return full
    return refer(scene, index)


# ------------------------------------------------------------------------------------------- captions


def describe(s: Shape) -> str:
    """ "large red circle", "small blue triangle pointing up", "large black vertical rectangle"."""
    if s.kind in LYING and s.orientation:
        return f"{s.size} {s.color} {s.orientation} {s.kind}"
    if s.kind in POINTING and s.orientation:
        return f"{s.size} {s.color} {s.kind} pointing {s.orientation}"
    return f"{s.size} {s.color} {s.kind}"


def reading_order(scene: Scene) -> list[Shape]:
    """Top row first, then left to right (by coarse row, then x)."""

    def key(s: Shape) -> tuple[int, int, int]:
        return _ROW.get(s.region.split()[0], 1), s.x, s.y

    return sorted(scene.shapes, key=key)


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def long_caption(scene: Scene) -> str:
    """The exact caption: every object with size, colour, shape, orientation and region."""
    fig = scene.figure
    if fig is not None:
        labels = _join(fig.labels)
        marks = []
        for c in fig.conditions:
            if c.key not in fig.drawn:
                continue
            if c.kind == "angle":
                marks.append(f"angle {c.target} marked as {c.value} degrees")
            elif c.kind == "side":
                marks.append(f"side {c.target} marked as {c.value}")
            elif c.kind == "equal":
                marks.append(f"tick marks showing {c.text}")
            elif c.kind == "right":
                marks.append(f"a right angle mark at {c.target}")
        text = f"A triangle with vertices labelled {labels}"
        if marks:
            text += ", with " + _join(marks)
        if fig.text_lines:
            text += ", and a question written below it"
        return text + "."
    parts = [f"{with_article(describe(s))} {REGION_PHRASES[s.region]}" for s in reading_order(scene)]
    return _capital(_join(parts)) + "."


_PREFIXES = ("", "", "an image of ", "a picture showing ", "a photo of ", "a drawing of ", "clip art of ")
_SUFFIXES = ("", "", "", " on a white background", " on white", ", vector art", " stock image")


def short_caption(scene: Scene, rng: random.Random) -> str:
    """A noisy, web-alt-text-like caption: partial and loosely phrased, but never false."""
    prefix, suffix = rng.choice(_PREFIXES), rng.choice(_SUFFIXES)
    if scene.figure is not None:
        body = rng.choice(("a geometry diagram", "a labelled triangle", "triangle abc", "a math figure"))
        return prefix + body + suffix
    shapes = scene.shapes
    style = rng.random()
    if style < 0.2:
        n = len(shapes)
        body = rng.choice(("some shapes", "colorful shapes", "geometric shapes", f"{NUMBER_WORDS[n]} shapes"))
        if n == 1:
            body = "a shape"
    else:
        chosen = rng.sample(shapes, k=min(len(shapes), rng.choice((1, 1, 2))))
        names = []
        for s in chosen:
            keep = [a for a in ("size", "color") if rng.random() < (0.3 if a == "size" else 0.6)]
            names.append(with_article(" ".join([getattr(s, a) for a in keep] + [s.kind])))
        body = " and ".join(names)
    return prefix + body + suffix


#: Alignment-caption framing. Web captions mix what only the image can tell with words any text
#: model predicts (boilerplate, set phrases, the obvious continuation); PRIOR's premise is that fitting
#: the latter teaches an MLLM to ignore the image. These frames give GeoWorld's alignment captions that
#: mix: everything outside `{body}` and the count is predictable from text alone, the body is not.
_OPENERS: tuple[str, ...] = (
    "The image shows {count} on a plain white background: {body}.",
    "This is a simple drawing of {count} on a white background: {body}.",
    "In this picture there {are} {count}: {body}.",
)
_CLOSERS: tuple[str, ...] = (
    "",
    " Nothing else is in the picture.",
    " The background is plain white.",
    " All of the shapes are drawn with flat colours.",
)
_MATH_OPENERS: tuple[str, ...] = (
    "The image shows a geometry diagram on a white background: {body}.",
    "This is a math figure from a geometry problem: {body}.",
)


def align_caption(scene: Scene, rng: random.Random) -> str:
    """The alignment caption: `long_caption`'s exact content inside text-predictable framing."""
    body = long_caption(scene).rstrip(".")
    if scene.figure is not None:
        return rng.choice(_MATH_OPENERS).format(body=body[:1].lower() + body[1:])
    n = len(scene.shapes)
    count = "one shape" if n == 1 else f"{NUMBER_WORDS[n]} shapes"
    opener = rng.choice(_OPENERS).format(
        count=count, are="is" if n == 1 else "are", body=body[:1].lower() + body[1:]
    )
    return opener + rng.choice(_CLOSERS)


# ----------------------------------------------------------------------------------------------- QA


def _far_from_mid(v: int, extent: int) -> bool:
    return abs(v - (extent - 1) / 2) >= 0.12 * extent


def qa_pool(
    scene: Scene, rng: random.Random, existence_yes: float = 0.5, existence_near: float = 0.5
) -> dict[str, list[QA]]:
    """All unambiguous questions about a scene, by category (some categories may be empty); the
    existence question is "yes" with probability `existence_yes` (`_existence`)."""
    pool: dict[str, list[QA]] = {c: [] for c in CATEGORIES}
    fig = scene.figure
    if fig is not None:
        cond = conditions_sentence(stated(fig))
        pool["math"].append(((cond + " " + fig.question).strip(), fig.answer))
        for c in fig.conditions:
            if c.key in fig.drawn and c.kind == "angle":
                pool["math"].append((f"What is the measure of angle {c.target} in degrees?", str(c.value)))
            elif c.key in fig.drawn and c.kind == "side":
                pool["math"].append((f"What is the length of {c.target}?", str(c.value)))
        pool["shape"].append(("What shape is shown in the figure?", "triangle"))
        return pool

    shapes = scene.shapes
    w, h = scene.width, scene.height
    for i, s in enumerate(shapes):
        ref = refer(scene, i, frozenset({"color"}))
        if ref:
            pool["colour"].append((f"What color is {ref}?", s.color))
        ref = refer(scene, i, frozenset({"kind"}))
        if ref:
            pool["shape"].append((f"What shape is {ref}?", s.kind))
        ref = refer(scene, i, frozenset({"size"}))
        if ref:
            pool["size"].append((f"Is {ref} small or large?", s.size))
        ref = refer(scene, i, allow_position=False)
        if ref and s.orientation:
            if s.kind in POINTING:
                pool["orientation"].append((f"Which way is {ref} pointing?", s.orientation))
            else:
                pool["orientation"].append((f"Is {ref} horizontal or vertical?", s.orientation))
        if ref and _far_from_mid(s.x, w):
            pool["position"].append(
                (f"Is {ref} on the left or the right?", "left" if s.x < w / 2 else "right")
            )
        if ref and _far_from_mid(s.y, h):
            pool["position"].append(
                (f"Is {ref} at the top or the bottom?", "top" if s.y < h / 2 else "bottom")
            )
    for i, j in combinations(range(len(shapes)), 2):
        a, b = shapes[i], shapes[j]
        ra, rb = refer(scene, i, allow_position=False), refer(scene, j, allow_position=False)
        if not (ra and rb):
            continue
        if rng.random() < 0.5:
            (a, ra), (b, rb) = (b, rb), (a, ra)
        if abs(a.x - b.x) >= a.radius + b.radius:
            pool["position"].append((f"Is {ra} to the left of {rb}?", "yes" if a.x < b.x else "no"))
        if abs(a.y - b.y) >= a.radius + b.radius:
            pool["position"].append((f"Is {ra} above {rb}?", "yes" if a.y < b.y else "no"))

    pool["count"].append(("How many shapes are there?", str(len(shapes))))
    kinds = sorted({s.kind for s in shapes}, key=SHAPES.index)
    for k in kinds:
        pool["count"].append((f"How many {PLURALS[k]} are there?", str(sum(s.kind == k for s in shapes))))
    for c in sorted({s.color for s in shapes}, key=COLOR_NAMES.index):
        pool["count"].append((f"How many {c} shapes are there?", str(sum(s.color == c for s in shapes))))
    absent_kinds = [k for k in SHAPES if k not in kinds]
    if absent_kinds and rng.random() < 0.3:
        pool["count"].append((f"How many {PLURALS[rng.choice(absent_kinds)]} are there?", "0"))

    pool["existence"].append(_existence(scene, rng, existence_yes, existence_near))
    return pool


def _existence(scene: Scene, rng: random.Random, yes: float = 0.5, near_share: float = 0.5) -> QA:
    """One yes/no existence probe, "yes" with probability `yes` (the demo's 0.5: equally likely); "no"
    objects are near misses (same shape in another colour) with probability `near_share`, which is what
    makes the question visual. The same number of draws whatever the shares, so a world's other
    questions do not move when they change."""
    present = sorted(scene.objects())
    kinds = {s.kind for s in scene.shapes}
    if rng.random() < yes:
        if rng.random() < 0.3:
            kind = rng.choice(sorted(kinds, key=SHAPES.index))
            return f"Is there {with_article(kind)} in the image?", "yes"
        return f"Is there {with_article(rng.choice(present))} in the image?", "yes"
    if rng.random() < 0.3 and len(kinds) < len(SHAPES):
        kind = rng.choice([k for k in SHAPES if k not in kinds])
        return f"Is there {with_article(kind)} in the image?", "no"
    absent = [f"{c} {k}" for k in SHAPES for c in COLOR_NAMES if f"{c} {k}" not in present]
    near = [o for o in absent if o.split()[1] in kinds]
    obj = rng.choice(near if near and rng.random() < near_share else absent)
    return f"Is there {with_article(obj)} in the image?", "no"


def pick_qa(qas: list[QA], rng: random.Random) -> QA:
    """One question, answer first: a uniformly chosen distinct answer, then a question with it.

    Without this, "how many" questions would mostly answer "1" (most per-colour and per-kind counts
    are one) and a model could score by guessing the majority answer.
    """
    answers = sorted({a for _, a in qas})
    answer = rng.choice(answers)
    return rng.choice([qa for qa in qas if qa[1] == answer])


def pick_turns(
    pool: dict[str, list[QA]], rng: random.Random, lo: int = 2, hi: int = 4
) -> list[tuple[str, QA]]:
    """2-4 distinct questions for one conversation, spreading over as many categories as possible."""
    cats = [c for c in CATEGORIES if pool[c]]
    rng.shuffle(cats)
    total = sum(len(pool[c]) for c in cats)
    k = min(rng.randint(lo, hi), total)
    remaining = {c: list(pool[c]) for c in cats}
    picks: list[tuple[str, QA]] = []
    while len(picks) < k:
        for c in cats:
            if len(picks) == k:
                break
            if remaining[c]:
                qa = pick_qa(remaining[c], rng)
                remaining[c].remove(qa)
                picks.append((c, qa))
    return picks


#: Answer sets a two-option question can draw its distractor from (categories with a closed set).
_CHOICES: tuple[tuple[str, ...], ...] = (
    COLOR_NAMES,
    SHAPES,
    SIZES,
    tuple(DIRECTIONS.values()),
    tuple(LIES.values()),
    ("yes", "no"),
    ("1", "2", "3", "4", "5"),
)
MC_CATEGORIES: frozenset[str] = frozenset({"colour", "shape", "size", "orientation", "existence", "count"})


def multiple_choice(category: str, question: str, answer: str, rng: random.Random) -> QA | None:
    """The question in MMVP's dress, `"{q} (a) X (b) Y"` answered `"(a)"`/`"(b)"`, or None.

    Training on some of these is what lets a model answer the MMVP-style benchmark in its format;
    the distractor comes from the same closed answer set, so the options never give the answer away.
    """
    if category not in MC_CATEGORIES:
        return None
    pool = next((c for c in _CHOICES if answer in c), None)
    if pool is None:
        return None
    other = rng.choice([c for c in pool if c != answer])
    opts = [answer, other]
    rng.shuffle(opts)
    letter = "a" if opts[0] == answer else "b"
    return f"{question} (a) {opts[0]} (b) {opts[1]}", f"({letter})"
