"""Hand-drawn-looking pictures with GeoWorld questions, for testing that a model sees beyond GeoWorld's pixels.

Deliberately independent of GeoWorld's renderer (no `render`, `geometry.outline` or `draw_shape`):
shapes are drawn here from their own outlines at 224 px, the way a person's picture arrives —
drawn at 4× and shrunk with LANCZOS (anti-aliased), vertices jittered and edges wobbling a few
pixels, slightly rotated, circles as wobbly polygons, fills in a shade *near* a named colour (never
the exact RGB), centres at arbitrary float positions (off GeoWorld's integer placement grid), on a
white or paper-tinted background. Sizes are GeoWorld's small/large radii at 64 px (8 and 13 px)
scaled by 224/64, give or take 10 %. Only the vocabulary (colour and shape names, phrasing) is
shared with GeoWorld, because that is what a user's question shares with it.

`handdrawn_cases()` returns `Case(image, question, answer, category)` tuples; `handdrawn_drawings()`
returns the pictures with what was drawn in them, so tests can check every answer against it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any, NamedTuple

from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from mllm.model import MultimodalLM

CANVAS = 224
SUPERSAMPLE = 4
#: GeoWorld's radii at 64 px (`scene.radius_for`: small 8, large 13) scaled to 224 px.
RADIUS = {"small": 8 * CANVAS / 64, "large": 13 * CANVAS / 64}

#: The eight colour words a GeoWorld question can use, with hand-picked nearby shades for each
#: (none equal to GeoWorld's own RGB; each clearly nearest its own name, checked in the tests).
SHADES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((205, 25, 40), (235, 45, 35), (200, 20, 20), (230, 20, 50)),
    "blue": ((40, 60, 215), (20, 85, 240), (25, 55, 200), (50, 90, 225)),
    "green": ((30, 150, 60), (10, 175, 45), (34, 139, 34), (40, 165, 70)),
    "yellow": ((240, 205, 20), (225, 185, 10), (250, 210, 30), (230, 200, 40)),
    "black": ((40, 40, 40), (15, 20, 30), (50, 45, 45), (30, 30, 35)),
    "purple": ((150, 50, 180), (125, 35, 175), (160, 60, 200), (130, 30, 200)),
    "orange": ((245, 140, 25), (255, 120, 0), (235, 125, 20), (250, 145, 40)),
    "cyan": ((10, 180, 200), (0, 200, 220), (20, 195, 205), (0, 175, 215)),
}
COLOUR_WORDS: tuple[str, ...] = tuple(SHADES)
SHAPE_WORDS: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "rectangle",
    "star",
    "arrow",
    "pentagon",
    "hexagon",
)
#: Canonical pose of pointing shapes is "up"; these turn them to another direction (clockwise degrees).
POINTING = ("triangle", "arrow")
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255),
    (252, 251, 247),
    (249, 249, 251),
    (254, 253, 250),
)

Point = tuple[float, float]


class Case(NamedTuple):
    """One question about one picture: unpacks as `(image, question, answer, category)`."""

    image: Image.Image
    question: str
    answer: str
    category: str


@dataclass
class Drawn:
    """One object as drawn: its words, its fill, and where it is in 224-px pixel coordinates."""

    kind: str
    colour: str
    size: str  # GeoWorld's size class the radius was drawn from ("small" / "large")
    rgb: tuple[int, int, int]
    x: float
    y: float
    radius: float
    angle: float


@dataclass
class Drawing:
    """A picture, the objects in it and the questions asked about it (question, answer, category)."""

    image: Image.Image
    objects: list[Drawn]
    background: tuple[int, int, int]
    questions: list[tuple[str, str, str]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ outlines


def _ngon(n: int, first_deg: float, radius: float = 1.0) -> list[Point]:
    return [
        (
            radius * math.cos(math.radians(first_deg + 360.0 * i / n)),
            radius * math.sin(math.radians(first_deg + 360.0 * i / n)),
        )
        for i in range(n)
    ]


def _unit_outline(kind: str, rng: random.Random) -> list[Point]:
    """The shape in units of its radius, y down, pointing up / lying horizontally, with a person's
    imprecision in its proportions (a star's inner radius, a rectangle's aspect, an arrow's head)."""
    if kind == "circle":
        # a wobbly closed stroke: radius varies smoothly by a few per cent around the loop
        phase1, phase2 = rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)
        amp1, amp2 = rng.uniform(0.01, 0.035), rng.uniform(0.0, 0.02)
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            r = 1.0 + amp1 * math.sin(2 * t + phase1) + amp2 * math.sin(3 * t + phase2)
            pts.append((r * math.cos(t), r * math.sin(t)))
        return pts
    if kind == "square":
        h = rng.uniform(0.68, 0.74)
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if kind == "rectangle":
        aspect = rng.uniform(1.8, 2.4)
        hw = rng.uniform(0.86, 0.94)
        hh = hw / aspect
        return [(-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh)]
    if kind == "triangle":
        return _ngon(3, -90.0)
    if kind == "pentagon":
        return _ngon(5, -90.0)
    if kind == "hexagon":
        return _ngon(6, 0.0)
    if kind == "star":
        inner = rng.uniform(0.4, 0.5)
        return [
            (
                (1.0 if i % 2 == 0 else inner) * math.cos(math.radians(-90.0 + 36.0 * i)),
                (1.0 if i % 2 == 0 else inner) * math.sin(math.radians(-90.0 + 36.0 * i)),
            )
            for i in range(10)
        ]
    if kind == "arrow":
        head_w, head_y, shaft_w = rng.uniform(0.62, 0.78), rng.uniform(-0.2, 0.0), rng.uniform(0.24, 0.32)
        return [
            (0.0, -1.0),
            (head_w, head_y),
            (shaft_w, head_y),
            (shaft_w, 0.95),
            (-shaft_w, 0.95),
            (-shaft_w, head_y),
            (-head_w, head_y),
        ]
    raise ValueError(f"unknown shape {kind!r}")


def _hand_outline(
    kind: str, x: float, y: float, radius: float, angle: float, rng: random.Random
) -> list[Point]:
    """Pixel outline: proportions, rotation and position as given, then vertices jittered by up to
    ~1.5 % of the radius and every straight edge bent slightly, as a drawn line is."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    jit = 0.0 if kind == "circle" else 0.015 * radius  # a circle's wobble is in its own outline
    corners = [
        (
            x + radius * (px * c - py * s) + rng.uniform(-jit, jit),
            y + radius * (px * s + py * c) + rng.uniform(-jit, jit),
        )
        for px, py in _unit_outline(kind, rng)
    ]
    if kind == "circle":
        return corners
    out: list[Point] = []
    for i, (ax, ay) in enumerate(corners):
        bx, by = corners[(i + 1) % len(corners)]
        length = math.hypot(bx - ax, by - ay) or 1.0
        nx, ny = -(by - ay) / length, (bx - ax) / length
        bow = rng.uniform(-0.012, 0.012) * length  # the edge bows a little to one side
        out.append((ax, ay))
        for t in (0.25, 0.5, 0.75):
            b = bow * math.sin(math.pi * t)
            out.append((ax + t * (bx - ax) + nx * b, ay + t * (by - ay) + ny * b))
    return out


def _shade(colour: str, rng: random.Random) -> tuple[int, int, int]:
    base = rng.choice(SHADES[colour])
    r, g, b = (min(255, max(0, v + rng.randint(-5, 5))) for v in base)
    return r, g, b


def draw(objects: list[Drawn], background: tuple[int, int, int], rng: random.Random) -> Image.Image:
    """Draw objects at 4× and shrink with LANCZOS to a 224 × 224 RGB picture."""
    big = CANVAS * SUPERSAMPLE
    img = Image.new("RGB", (big, big), background)
    pen = ImageDraw.Draw(img)
    for o in objects:
        pts = _hand_outline(o.kind, o.x, o.y, o.radius, o.angle, rng)
        pen.polygon([(SUPERSAMPLE * px, SUPERSAMPLE * py) for px, py in pts], fill=o.rgb)
    return img.resize((CANVAS, CANVAS), Image.Resampling.LANCZOS)


# ------------------------------------------------------------------------------------------ layouts


def _angle(kind: str, rng: random.Random) -> float:
    """Slightly off the canonical pose; pointing shapes and rectangles may also be turned by 90° steps."""
    tilt = rng.uniform(-8.0, 8.0)
    if kind in POINTING:
        return rng.choice((0, 90, 180, 270)) + tilt
    if kind == "rectangle":
        return rng.choice((0, 90)) + tilt
    return tilt


def _place(specs: list[tuple[str, str, str]], rng: random.Random) -> list[Drawn]:
    """Float centres anywhere on the canvas, clear of the border and (by 6 px) of each other."""
    for _ in range(200):
        objs: list[Drawn] = []
        for kind, colour, size in specs:
            r = RADIUS[size] * rng.uniform(0.9, 1.1)
            for _ in range(200):
                x, y = rng.uniform(r + 4, CANVAS - 4 - r), rng.uniform(r + 4, CANVAS - 4 - r)
                if all(math.hypot(x - o.x, y - o.y) >= r + o.radius + 6 for o in objs):
                    objs.append(Drawn(kind, colour, size, _shade(colour, rng), x, y, r, _angle(kind, rng)))
                    break
            else:
                break
        if len(objs) == len(specs):
            return objs
        specs = [(k, c, "small") for k, c, _ in specs]  # crowded: retry with small objects
    raise RuntimeError(f"cannot place {specs}")


def _picture(specs: list[tuple[str, str, str]], rng: random.Random) -> Drawing:
    objs = _place(specs, rng)
    bg = rng.choice(BACKGROUNDS)
    return Drawing(image=draw(objs, bg, rng), objects=objs, background=bg)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _plural(kind: str) -> str:
    return kind + "s"


def _distinct(rng: random.Random, words: tuple[str, ...], n: int) -> list[str]:
    return rng.sample(list(words), n)


def _size(rng: random.Random) -> str:
    return rng.choice(("small", "large"))


@cache
def handdrawn_drawings(seed: int = 0) -> tuple[Drawing, ...]:
    """All pictures with their questions (one per picture; 86 in all), deterministic in `seed`.

    Questions use GeoWorld's exact phrasing for the object they name: "the circle" / "the object"
    when it is alone, "the red object" when only its colour tells it apart.
    """
    rng = random.Random(seed)
    out: list[Drawing] = []

    def add(specs: list[tuple[str, str, str]], question: str, answer: str, category: str) -> None:
        d = _picture(specs, rng)
        d.questions.append((question, answer, category))
        out.append(d)

    # colour: single objects (each colour twice, shapes cycling), then the named one among 2-3 shapes
    for i, colour in enumerate(COLOUR_WORDS * 2):
        kind = SHAPE_WORDS[(i * 3) % len(SHAPE_WORDS)]
        add([(kind, colour, _size(rng))], f"What color is the {kind}?", colour, "colour")
    for i in range(8):
        kinds = _distinct(rng, SHAPE_WORDS, 2 + i % 2)
        colours = _distinct(rng, COLOUR_WORDS, len(kinds))
        add(
            [(k, c, _size(rng)) for k, c in zip(kinds, colours)],
            f"What color is the {kinds[0]}?",
            colours[0],
            "colour",
        )
    # shape: single objects (each shape twice, colours cycling), then the one of a given colour
    for i, kind in enumerate(SHAPE_WORDS * 2):
        colour = COLOUR_WORDS[(i * 5) % len(COLOUR_WORDS)]
        add([(kind, colour, _size(rng))], "What shape is the object?", kind, "shape")
    for i in range(8):
        colours = _distinct(rng, COLOUR_WORDS, 2 + i % 2)
        kinds = _distinct(rng, SHAPE_WORDS, len(colours))
        add(
            [(k, c, _size(rng)) for k, c in zip(kinds, colours)],
            f"What shape is the {colours[0]} object?",
            kinds[0],
            "shape",
        )
    # count: 1-3 shapes of any kinds and colours (repeats allowed, as in GeoWorld's themed scenes)
    for n in (1, 2, 3) * 6:
        specs = [(rng.choice(SHAPE_WORDS), rng.choice(COLOUR_WORDS), _size(rng)) for _ in range(n)]
        add(specs, "How many shapes are there?", str(n), "count")
    for n_same in (1, 2, 2, 1):  # "How many circles are there?" over 2-3 shapes
        kind = rng.choice(SHAPE_WORDS)
        others = [k for k in SHAPE_WORDS if k != kind]
        specs = [(kind, c, _size(rng)) for c in _distinct(rng, COLOUR_WORDS, n_same)]
        specs += [
            (rng.choice(others), rng.choice(COLOUR_WORDS), _size(rng))
            for _ in range(3 - n_same - (n_same == 1))
        ]
        rng.shuffle(specs)
        add(specs, f"How many {_plural(kind)} are there?", str(n_same), "count")
    # existence: present objects, and near misses (right shape in another colour / right colour on another shape)
    for i in range(16):
        n = 1 + i % 3
        kinds = _distinct(rng, SHAPE_WORDS, n)
        colours = [rng.choice(COLOUR_WORDS) for _ in range(n)]
        specs = [(k, c, _size(rng)) for k, c in zip(kinds, colours)]
        if i % 2 == 0:
            kind, colour = kinds[0], colours[0]
            answer = "yes"
        elif i % 4 == 1:
            kind = kinds[0]
            colour = rng.choice(
                [c for c in COLOUR_WORDS if (kind, c) not in {(k, c2) for k, c2 in zip(kinds, colours)}]
            )
            answer = "no"
        else:
            colour = colours[0]
            kind = rng.choice([k for k in SHAPE_WORDS if k not in kinds])
            answer = "no"
        add(specs, f"Is there {_article(colour)} {colour} {kind} in the image?", answer, "existence")
    return tuple(out)


def handdrawn_cases(seed: int = 0) -> list[Case]:
    """The generalisation test set: `(image, question, answer, category)` for every hand-drawn picture."""
    return [Case(d.image, q, a, cat) for d in handdrawn_drawings(seed) for q, a, cat in d.questions]


def evaluate(model: MultimodalLM, cases: Sequence[Case], batch_size: int = 16) -> dict[str, Any]:
    """Greedy answers to every case, scored as GeoWorld's QA benchmark scores (`geoworld_qa.judge`:
    "Yes, there is." is yes, "3 shapes" is 3), so this accuracy is comparable to the in-world one.

    Returns {"accuracy", "per_category", "n", "wrong": [{question, answer, response, category, index}]}.
    """
    from mllm.evaluation.benchmarks.core import Item
    from mllm.evaluation.benchmarks.geoworld_qa import judge
    from mllm.inference import answer_batch

    responses = answer_batch(
        model, [c.question for c in cases], [c.image for c in cases], max_new_tokens=16, batch_size=batch_size
    )
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    wrong = []
    for i, (case, response) in enumerate(zip(cases, responses)):
        _, ok = judge(
            Item(id=str(i), prompt=case.question, image=None, meta={"answer": case.answer}), response
        )
        total[case.category] = total.get(case.category, 0) + 1
        right[case.category] = right.get(case.category, 0) + int(ok)
        if not ok:
            wrong.append(
                {
                    "index": i,
                    "category": case.category,
                    "question": case.question,
                    "answer": case.answer,
                    "response": response,
                }
            )
    return {
        "accuracy": sum(right.values()) / max(1, len(cases)),
        "per_category": {c: right[c] / total[c] for c in sorted(total)},
        "n": dict(sorted(total.items())),
        "wrong": wrong,
    }
