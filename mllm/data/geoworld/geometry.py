"""Shape outlines as polygons, and the pixel-exact boxes of what PIL actually fills.

Every outline is inscribed in the circle of the shape's radius around its centre, so "no two
bounding circles intersect" is a sufficient, cheap non-overlap test for the sampler. Boxes are
measured on a rendered mask rather than computed from vertices: rasterisation rules decide which
border pixels get filled, and a box that is tight around the *drawn* pixels is what grounding needs.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

Point = tuple[float, float]

# Canonical outlines in units of the radius, y pointing down, pointing "up" / lying horizontally.
_RECT_HALF_W = math.cos(math.atan(0.5))


def _regular(n: int, start_deg: float) -> list[Point]:
    return [
        (math.cos(math.radians(start_deg + 360.0 * k / n)), math.sin(math.radians(start_deg + 360.0 * k / n)))
        for k in range(n)
    ]


_UNIT: dict[str, list[Point]] = {
    "square": _regular(4, 45.0),
    "triangle": _regular(3, -90.0),
    "pentagon": _regular(5, -90.0),
    "hexagon": _regular(6, 0.0),
    "star": [
        (
            (1.0 if k % 2 == 0 else 0.45) * math.cos(math.radians(-90.0 + 36.0 * k)),
            (1.0 if k % 2 == 0 else 0.45) * math.sin(math.radians(-90.0 + 36.0 * k)),
        )
        for k in range(10)
    ],
    "rectangle": [
        (-_RECT_HALF_W, -_RECT_HALF_W / 2),
        (_RECT_HALF_W, -_RECT_HALF_W / 2),
        (_RECT_HALF_W, _RECT_HALF_W / 2),
        (-_RECT_HALF_W, _RECT_HALF_W / 2),
    ],
    "arrow": [
        (0.0, -1.0),
        (0.72, -0.12),
        (0.3, -0.12),
        (0.3, 0.95),
        (-0.3, 0.95),
        (-0.3, -0.12),
        (-0.72, -0.12),
    ],
}


def outline(kind: str, x: float, y: float, radius: float, angle: int) -> list[Point] | None:
    """Polygon vertices of a shape (None for a circle), rotated `angle` degrees clockwise."""
    if kind == "circle":
        return None
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(x + radius * (px * c - py * s), y + radius * (px * s + py * c)) for px, py in _UNIT[kind]]


def draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, x: float, y: float, radius: float, angle: int, fill: object
) -> None:
    """Fill one shape; the single drawing routine, so image and mask can never disagree."""
    pts = outline(kind, x, y, radius, angle)
    if pts is None:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill)
    else:
        draw.polygon(pts, fill=fill)


def shape_box(kind: str, x: float, y: float, radius: float, angle: int, width: int, height: int) -> list[int]:
    """Tight pixel box [x1, y1, x2, y2] of the filled pixels; x2/y2 exclusive (PIL crop convention)."""
    mask = Image.new("L", (width, height), 0)
    draw_shape(ImageDraw.Draw(mask), kind, x, y, radius, angle, 255)
    bbox = mask.getbbox()
    if bbox is None:  # entirely off-canvas; the sampler never produces this
        return [0, 0, 0, 0]
    return [int(v) for v in bbox]
