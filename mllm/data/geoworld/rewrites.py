"""More captions of a GeoWorld scene, for the caption-centred contrastive methods.

Each is a pure function of the scene graph and the given RNG (the writer passes its own stream per
image, so every other file of the world is unchanged by them):

- `rewrites` (LaCLIP, Fan et al. 2023): paraphrases of the exact caption. LaCLIP rewrites each caption
  with an LLM, keeping its content and changing its wording; here the scene graph is re-worded: the
  objects in another order, attributes in another construction ("a large red circle" / "a red circle
  that is large" / "a large circle in red"), region synonyms ("at the top left" / "in the upper left
  corner") and another frame. Every rewrite states every object with its size, colour, shape,
  orientation and region, so it is as true (and as complete) as the exact caption.
- `noisy_caption` (ALIGN, Jia et al. 2021): web alt-text as ALIGN trains on it: short, partial (some
  objects and attributes left out) and sometimes wrong: with probability `NOISY_ERROR_RATE` one named
  object gets a wrong colour or shape (one the scene does not have for it). GeoWorld's `short` caption
  is partial but never false; this one is the noisy-pairs regime.
- `sub_captions` (DreamLIP, Zheng et al. 2024): a long, multi-sentence description split into its
  sentences, each true on its own: one per object (its attributes and region), one with the count.
  The long caption is their concatenation (`long_description`).
- `synthetic_caption` (ALIP, Yang et al. 2023): what an off-the-shelf captioner (OFA in ALIP) writes:
  accurate but generic: the count and the objects' colour and shape, no sizes or places.

`caption_variants` gathers them into the fields the writer adds to a captions.jsonl row.
"""

from __future__ import annotations

import random

from .language import describe, long_caption, reading_order
from .scene import Scene, Shape
from .vocab import COLOR_NAMES, LYING, NUMBER_WORDS, POINTING, REGION_PHRASES, SHAPES, with_article

__all__ = [
    "NOISY_ERROR_RATE",
    "N_REWRITES",
    "REGION_SYNONYMS",
    "caption_variants",
    "long_description",
    "noisy_caption",
    "rewrites",
    "sub_captions",
    "synthetic_caption",
]

#: Rewrites written per caption (LaCLIP uses 4 rewrites beside the original).
N_REWRITES = 4
#: Share of noisy (ALIGN) captions with one wrong attribute.
NOISY_ERROR_RATE = 0.2

#: Ways of saying each region; the first is `long_caption`'s own (vocab.REGION_PHRASES).
REGION_SYNONYMS: dict[str, tuple[str, ...]] = {
    "top left": (REGION_PHRASES["top left"], "in the top left corner", "in the upper left"),
    "top": (REGION_PHRASES["top"], "near the top", "at the top edge"),
    "top right": (REGION_PHRASES["top right"], "in the top right corner", "in the upper right"),
    "left": (REGION_PHRASES["left"], "on the left side", "at the left"),
    "center": (REGION_PHRASES["center"], "in the middle", "at the center"),
    "right": (REGION_PHRASES["right"], "on the right side", "at the right"),
    "bottom left": (REGION_PHRASES["bottom left"], "in the bottom left corner", "in the lower left"),
    "bottom": (REGION_PHRASES["bottom"], "near the bottom", "at the bottom edge"),
    "bottom right": (REGION_PHRASES["bottom right"], "in the bottom right corner", "in the lower right"),
}


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _orientation_tail(s: Shape) -> str:
    """The orientation said after the noun: " pointing up", " lying horizontally", or nothing."""
    if s.kind in POINTING and s.orientation:
        return f" pointing {s.orientation}"
    if s.kind in LYING and s.orientation:
        return " lying horizontally" if s.orientation == "horizontal" else " standing vertically"
    return ""


def _object_phrase(s: Shape, style: int) -> str:
    """One object with all its attributes, in one of three constructions (style 0 = `describe`)."""
    if style == 0:
        return with_article(describe(s))
    if style == 1:
        return f"{with_article(s.color + ' ' + s.kind)}{_orientation_tail(s)} that is {s.size}"
    return f"{with_article(s.size + ' ' + s.kind)} in {s.color}{_orientation_tail(s)}"


def _count(n: int) -> str:
    return "one shape" if n == 1 else f"{NUMBER_WORDS[n]} shapes"


_FRAMES: tuple[str, ...] = (
    "{Objs}.",
    "There {are} {count}: {objs}.",
    "The picture shows {objs}.",
    "An image with {objs}.",
    "{Count} on a white background: {objs}.",
)


def _figure_rewrites(scene: Scene, rng: random.Random, k: int) -> list[str]:
    body = long_caption(scene).rstrip(".")
    low = body[:1].lower() + body[1:]
    frames = [
        f"The figure shows {low}.",
        f"A geometry diagram: {low}.",
        f"This math figure is {low}.",
        f"Pictured is {low}.",
        f"A drawing of {low}.",
    ]
    rng.shuffle(frames)
    return frames[:k]


def rewrites(scene: Scene, rng: random.Random, k: int = N_REWRITES) -> list[str]:
    """`k` distinct paraphrases of `long_caption(scene)` (fewer only if the scene allows fewer), each
    stating every object's size, colour, shape, orientation and region. Not the exact caption itself."""
    if scene.figure is not None:
        return _figure_rewrites(scene, rng, k)
    exact = long_caption(scene)
    n = len(scene.shapes)
    out: list[str] = []
    for _ in range(8 * k):
        if len(out) == k:
            break
        shapes = list(reading_order(scene))
        if rng.random() < 0.5:
            rng.shuffle(shapes)
        style = rng.randrange(3)
        clauses = []
        for s in shapes:
            where = rng.choice(REGION_SYNONYMS[s.region])
            phrase = _object_phrase(s, style)
            clauses.append(f"{phrase} {where}" if rng.random() < 0.7 else f"{where} {phrase}")
        objs = _join(clauses)
        frame = rng.choice(_FRAMES)
        text = frame.format(
            Objs=_capital(objs),
            objs=objs,
            count=_count(n),
            Count=_capital(_count(n)),
            are="is" if n == 1 else "are",
        )
        if text != exact and text not in out:
            out.append(text)
    return out


def sub_captions(scene: Scene) -> list[str]:
    """The sentences of a long description, each true on its own: the count, then one per object in
    reading order (a math figure: the triangle, then one per drawn mark)."""
    fig = scene.figure
    if fig is not None:
        out = [f"The image shows a triangle with vertices labelled {_join(list(fig.labels))}."]
        for c in fig.conditions:
            if c.key not in fig.drawn:
                continue
            if c.kind == "angle":
                out.append(f"Angle {c.target} is marked as {c.value} degrees.")
            elif c.kind == "side":
                out.append(f"Side {c.target} is marked as {c.value}.")
            elif c.kind == "equal":
                out.append(f"Tick marks show {c.text}.")
            elif c.kind == "right":
                out.append(f"A right angle is marked at {c.target}.")
        if fig.text_lines:
            out.append("A question is written below the triangle.")
        return out
    n = len(scene.shapes)
    out = [f"There {'is' if n == 1 else 'are'} {_count(n)} in the image."]
    out += [f"There is {with_article(describe(s))} {REGION_PHRASES[s.region]}." for s in reading_order(scene)]
    return out


def long_description(scene: Scene) -> str:
    """DreamLIP's long caption: the sub-captions as one paragraph."""
    return " ".join(sub_captions(scene))


_PREFIXES = ("", "", "an image of ", "a picture showing ", "a photo of ", "clip art of ")
_SUFFIXES = ("", "", " on a white background", ", vector art", " stock image")


def noisy_caption(scene: Scene, rng: random.Random, error_rate: float = NOISY_ERROR_RATE) -> tuple[str, bool]:
    """(caption, wrong): a short alt-text-like caption naming one or two objects with some of their
    attributes; with probability `error_rate` one named object's colour or shape is replaced by one it
    does not have (`wrong` is then True: the caption is false of the image)."""
    prefix, suffix = rng.choice(_PREFIXES), rng.choice(_SUFFIXES)
    if scene.figure is not None:
        wrong = rng.random() < error_rate
        body = "a labelled square" if wrong else rng.choice(("a labelled triangle", "a geometry diagram"))
        return prefix + body + suffix, wrong
    chosen = rng.sample(scene.shapes, k=min(len(scene.shapes), rng.choice((1, 1, 2))))
    wrong = rng.random() < error_rate
    bad = rng.randrange(len(chosen)) if wrong else -1
    present = scene.objects()
    names = []
    for j, s in enumerate(chosen):
        color, kind = s.color, s.kind
        if j == bad:
            if rng.random() < 0.5:
                color = rng.choice([c for c in COLOR_NAMES if f"{c} {kind}" not in present])
            else:
                kind = rng.choice([k for k in SHAPES if f"{color} {k}" not in present])
        words = [s.size] if rng.random() < 0.3 else []
        words += [color, kind]
        names.append(with_article(" ".join(words)))
    return prefix + " and ".join(names) + suffix, wrong


def synthetic_caption(scene: Scene, rng: random.Random) -> str:
    """A captioner's caption: the count and each object's colour and shape (no sizes, no places)."""
    if scene.figure is not None:
        return rng.choice(("a geometry diagram of a labelled triangle", "a math figure with a triangle"))
    names = [with_article(f"{s.color} {s.kind}") for s in reading_order(scene)]
    opener = rng.choice(("a picture of", "an image of", "a drawing of"))
    return f"{opener} {_count(len(names))}: {_join(names)}"


def caption_variants(scene: Scene, rng: random.Random) -> dict[str, object]:
    """The fields a captions.jsonl row gets from this module: rewrites, noisy, sub_captions, synthetic."""
    return {
        "rewrites": rewrites(scene, rng),
        "noisy": noisy_caption(scene, rng)[0],
        "sub_captions": sub_captions(scene),
        "synthetic": synthetic_caption(scene, rng),
    }
