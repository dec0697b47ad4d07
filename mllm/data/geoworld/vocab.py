"""The closed vocabulary of GeoWorld: colours, shapes, sizes, directions and regions.

Everything the world can say is drawn from these few tables, so captions, questions and answers
stay small and regular (a tiny tokenizer covers them, and exact-match scoring is meaningful).
The sampling weights are deliberately mildly non-uniform: a world where some objects are more
frequent than others is what gives POPE's "popular" negatives a meaning.
"""

from __future__ import annotations

#: Named colours, chosen to stay distinguishable after downscaling and JPEG coding on white.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "blue": (30, 70, 230),
    "green": (20, 160, 50),
    "yellow": (235, 195, 0),
    "black": (25, 25, 25),
    "purple": (140, 40, 190),
    "orange": (250, 130, 10),
    "cyan": (0, 190, 210),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

#: Shape kinds. Triangles and arrows point (up/right/down/left), rectangles lie or stand.
SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "rectangle",
    "star",
    "arrow",
    "pentagon",
    "hexagon",
)
PLURALS: dict[str, str] = {k: k + "s" for k in SHAPES}
POINTING: frozenset[str] = frozenset({"triangle", "arrow"})
LYING: frozenset[str] = frozenset({"rectangle"})
#: Kinds whose rotation is not part of the scene's meaning (always drawn upright).
UPRIGHT: tuple[str, ...] = ("circle", "square", "star", "pentagon", "hexagon")

#: Mild Zipf-like weights (index order of COLOR_NAMES / SHAPES).
COLOR_WEIGHTS: tuple[float, ...] = tuple(1.0 / (1.0 + 0.15 * i) for i in range(len(COLOR_NAMES)))
SHAPE_WEIGHTS: tuple[float, ...] = tuple(1.0 / (1.0 + 0.15 * i) for i in range(len(SHAPES)))

SIZES: tuple[str, ...] = ("small", "large")

#: Clockwise rotation (degrees) from the canonical pose → the word for it.
DIRECTIONS: dict[int, str] = {0: "up", 90: "right", 180: "down", 270: "left"}
LIES: dict[int, str] = {0: "horizontal", 90: "vertical"}

#: The nine coarse regions (3 × 3 grid) and how a caption places an object in each.
REGION_PHRASES: dict[str, str] = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
PHRASE_REGIONS: dict[str, str] = {v: k for k, v in REGION_PHRASES.items()}

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")

#: QA categories, in the order the balanced held-out split cycles through them.
CATEGORIES: tuple[str, ...] = (
    "colour",
    "shape",
    "count",
    "position",
    "orientation",
    "size",
    "existence",
    "math",
)


def article(word: str) -> str:
    """'a' or 'an' for the word that follows (only 'orange' and 'arrow' need 'an' here)."""
    return "an" if word[:1] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    """Prefix the right indefinite article."""
    return f"{article(phrase)} {phrase}"
