"""The scene graph (plain dataclasses, JSON via `asdict`) and the seeded sampler of scenes.

A scene is the single source of truth: the image, every caption, phrase, box, question and answer
is a pure function of it. Derived fields (radius, orientation word, region, box) are stored too,
so a consumer of `scenes.jsonl` needs no GeoWorld code to check an answer, and are always made by
`make_shape` so they can never disagree with the primary ones.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .geometry import shape_box
from .vocab import (
    COLOR_NAMES,
    COLOR_WEIGHTS,
    DIRECTIONS,
    LIES,
    LYING,
    POINTING,
    SHAPE_WEIGHTS,
    SHAPES,
    SIZES,
)

BACKGROUND: tuple[int, int, int] = (255, 255, 255)


@dataclass
class Shape:
    """One filled primitive. `angle` is the clockwise rotation from the canonical pose."""

    kind: str
    color: str
    size: str
    radius: int
    x: int
    y: int
    angle: int
    orientation: str | None
    region: str
    box: list[int]

    @property
    def obj(self) -> str:
        """The POPE object name: "red circle"."""
        return f"{self.color} {self.kind}"


@dataclass
class Condition:
    """One piece of information of a geometry problem, movable between question text and figure.

    role: "property" (MathVerse's implicit property, e.g. AB = AC, drawn as tick marks) or
    "condition" (an essential numeric condition, e.g. angle A = 50°, drawn as a value).
    """

    key: str
    kind: str  # "angle" | "side" | "equal" | "right"
    role: str
    target: str  # vertex ("A") or side ("AB"); for "equal" the sides joined by "=" ("AB=AC")
    value: int | None
    text: str  # the words used in a question: "angle A = 50°"


@dataclass
class MathFigure:
    """A labelled triangle problem: geometry to scale, its conditions, what is drawn, the answer."""

    problem: str
    labels: list[str]
    points: list[list[float]]
    angles: dict[str, float]
    sides: dict[str, float]
    description: str
    conditions: list[Condition]
    question: str
    answer: str
    unit: str
    drawn: list[str] = field(default_factory=list)
    text_lines: list[str] = field(default_factory=list)
    figure_height: int = 0


@dataclass
class Scene:
    """A canvas and what is on it: primitives, or (for math scenes) one labelled figure."""

    width: int
    height: int
    shapes: list[Shape]
    figure: MathFigure | None = None
    background: list[int] = field(default_factory=lambda: list(BACKGROUND))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def objects(self) -> set[str]:
        """Present "colour kind" objects."""
        return {s.obj for s in self.shapes}


def scene_from_dict(d: dict[str, Any]) -> Scene:
    """Inverse of `Scene.to_dict` (used by benchmark writers and tests)."""
    fig = d.get("figure")
    figure = None
    if fig is not None:
        fig = dict(fig)
        fig["conditions"] = [Condition(**c) for c in fig["conditions"]]
        figure = MathFigure(**fig)
    return Scene(
        width=d["width"],
        height=d["height"],
        shapes=[Shape(**s) for s in d["shapes"]],
        figure=figure,
        background=list(d.get("background", BACKGROUND)),
    )


# ----------------------------------------------------------------------------------------- geometry rules


def radius_for(size: str, canvas: int) -> int:
    """Pixel radius of a size class; ≥ 7 px (small) so shapes stay recognisable at 64 px."""
    small = max(7, round(canvas * 0.125))
    if size == "small":
        return small
    return max(small + 4, round(canvas * 0.2))


def margin_for(canvas: int) -> int:
    return max(1, canvas // 64)


def gap_for(canvas: int) -> int:
    """Minimum empty pixels between the bounding circles of two shapes."""
    return max(2, canvas // 32)


def region_of(x: float, y: float, width: int, height: int) -> str:
    """Coarse 3 × 3 region name of a point: "top left", "top", ..., "center", ..."""
    col = "left" if x < width / 3 else ("right" if x >= 2 * width / 3 else "center")
    row = "top" if y < height / 3 else ("bottom" if y >= 2 * height / 3 else "middle")
    if row == "middle":
        return col
    if col == "center":
        return row
    return f"{row} {col}"


def in_region(shape_region: str, phrase_region: str) -> bool:
    """Whether an object in `shape_region` is described by the phrase for `phrase_region`.

    A one-word region is read loosely ("on the left" covers "top left", "left", "bottom left");
    "center" and two-word regions are read exactly.
    """
    return set(phrase_region.split()) <= set(shape_region.split())


def orientation_of(kind: str, angle: int) -> str | None:
    if kind in POINTING:
        return DIRECTIONS[angle % 360]
    if kind in LYING:
        return LIES[angle % 180]
    return None


def make_shape(
    kind: str, color: str, size: str, x: int, y: int, angle: int, width: int, height: int
) -> Shape:
    """Build a shape with all derived fields filled in consistently."""
    radius = radius_for(size, min(width, height))
    return Shape(
        kind=kind,
        color=color,
        size=size,
        radius=radius,
        x=x,
        y=y,
        angle=angle,
        orientation=orientation_of(kind, angle),
        region=region_of(x, y, width, height),
        box=shape_box(kind, x, y, radius, angle, width, height),
    )


def moved(shape: Shape, width: int, height: int, **changes: Any) -> Shape:
    """A copy of `shape` with primary fields changed and derived ones recomputed."""
    d = {k: getattr(shape, k) for k in ("kind", "color", "size", "x", "y", "angle")}
    d.update(changes)
    return make_shape(width=width, height=height, **d)


def in_bounds(x: int, y: int, radius: int, width: int, height: int) -> bool:
    m = margin_for(min(width, height))
    return radius + m <= x <= width - 1 - radius - m and radius + m <= y <= height - 1 - radius - m


def fits(x: int, y: int, radius: int, others: list[Shape], width: int, height: int) -> bool:
    """In bounds and clear (by the gap) of every other shape's bounding circle."""
    if not in_bounds(x, y, radius, width, height):
        return False
    g = gap_for(min(width, height))
    return all((x - o.x) ** 2 + (y - o.y) ** 2 >= (radius + o.radius + g) ** 2 for o in others)


def overlapping(shapes: list[Shape]) -> bool:
    """True when any two bounding circles come closer than touching."""
    for i, a in enumerate(shapes):
        for b in shapes[i + 1 :]:
            if (a.x - b.x) ** 2 + (a.y - b.y) ** 2 < (a.radius + b.radius) ** 2:
                return True
    return False


def place(
    rng: random.Random, radius: int, others: list[Shape], width: int, height: int
) -> tuple[int, int] | None:
    """A uniformly random free centre for a shape of this radius, or None if there is none.

    Exact (every admissible integer centre is enumerated), so crowded scenes never fail by bad
    luck, and one RNG draw per placement keeps sampling cheap.
    """
    m = margin_for(min(width, height))
    lo_x, hi_x = radius + m, width - 1 - radius - m
    lo_y, hi_y = radius + m, height - 1 - radius - m
    if lo_x > hi_x or lo_y > hi_y:
        return None
    ys, xs = np.mgrid[lo_y : hi_y + 1, lo_x : hi_x + 1]
    ok = np.ones(xs.shape, dtype=bool)
    g = gap_for(min(width, height))
    for o in others:
        ok &= (xs - o.x) ** 2 + (ys - o.y) ** 2 >= (radius + o.radius + g) ** 2
    free = np.flatnonzero(ok)
    if free.size == 0:
        return None
    k = int(free[rng.randrange(free.size)])
    return int(xs.flat[k]), int(ys.flat[k])


def random_angle(rng: random.Random, kind: str) -> int:
    if kind in POINTING:
        return rng.choice((0, 90, 180, 270))
    if kind in LYING:
        return rng.choice((0, 90))
    return 0


def pick_kind(rng: random.Random, kinds: tuple[str, ...] = SHAPES) -> str:
    return rng.choices(kinds, weights=[SHAPE_WEIGHTS[SHAPES.index(k)] for k in kinds])[0]


def pick_color(rng: random.Random, colors: tuple[str, ...] = COLOR_NAMES) -> str:
    return rng.choices(colors, weights=[COLOR_WEIGHTS[COLOR_NAMES.index(c)] for c in colors])[0]


def sample_scene(
    rng: random.Random,
    size: int,
    *,
    min_shapes: int = 1,
    max_shapes: int = 5,
    kinds: tuple[str, ...] = SHAPES,
    colors: tuple[str, ...] = COLOR_NAMES,
) -> Scene:
    """Sample a scene of non-overlapping primitives with distinct (kind, colour, size) triples.

    Distinct triples make "the large red circle" always a unique referring expression, so every
    object can be named; shorter expressions are found by `language.refer`. A fifth of scenes share
    one kind and a fifth one colour: these "themes" give counting questions answers above one and
    give POPE's co-occurrence statistics (adversarial negatives) real structure. When the objects
    do not fit, the sampler restarts, and after repeated failures drops one object; all of it
    driven by `rng`, so the result is a pure function of the RNG state.
    """
    count = rng.randint(min_shapes, max_shapes)
    while True:
        for _ in range(20):
            shapes = _try_sample(rng, size, count, kinds, colors)
            if shapes is not None:
                return Scene(width=size, height=size, shapes=shapes)
        if count <= 1:
            raise RuntimeError(f"cannot place a single shape on a {size}px canvas")
        count -= 1


def _try_sample(
    rng: random.Random, size: int, count: int, kinds: tuple[str, ...], colors: tuple[str, ...]
) -> list[Shape] | None:
    theme = rng.random()
    theme_kind = pick_kind(rng, kinds) if theme < 0.2 and count > 1 else None
    theme_color = pick_color(rng, colors) if 0.2 <= theme < 0.4 and count > 1 else None
    shapes: list[Shape] = []
    used: set[tuple[str, str, str]] = set()
    for _ in range(count):
        for _ in range(30):
            triple = (
                theme_kind or pick_kind(rng, kinds),
                theme_color or pick_color(rng, colors),
                rng.choice(SIZES),
            )
            if triple not in used:
                break
        else:
            return None
        kind, color, size_name = triple
        radius = radius_for(size_name, size)
        centre = place(rng, radius, shapes, size, size)
        if centre is None:
            return None
        used.add(triple)
        shapes.append(
            make_shape(kind, color, size_name, centre[0], centre[1], random_angle(rng, kind), size, size)
        )
    return shapes
