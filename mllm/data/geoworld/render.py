"""PIL drawing of a scene graph, and the boxes of what a math figure draws.

Nothing here samples: the image is a pure function of the scene, which is what makes the world
byte-reproducible and lets tests recompute any answer from `scenes.jsonl` alone.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from .fonts import font, label_size, line_height, text_size
from .geometry import draw_shape
from .scene import MathFigure, Scene
from .vocab import COLORS

INK = (0, 0, 0)


def render(scene: Scene) -> Image.Image:
    """Draw the scene on its background (RGB)."""
    img = Image.new("RGB", (scene.width, scene.height), tuple(scene.background))
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        draw_shape(draw, s.kind, s.x, s.y, s.radius, s.angle, COLORS[s.color])
    if scene.figure is not None:
        _draw_figure(draw, scene.figure, scene.width)
    return img


def save_png(img: Image.Image, path: Path) -> None:
    """PNG without metadata: deterministic bytes for deterministic pixels."""
    img.save(path, format="PNG", optimize=False, compress_level=6)


def save_jpeg(img: Image.Image, path: Path) -> None:
    """JPEG at high quality without chroma subsampling, so small coloured shapes keep their hue."""
    img.save(path, format="JPEG", quality=95, subsampling=0)


# ------------------------------------------------------------------------------------------ math figures


def _unit(dx: float, dy: float) -> tuple[float, float]:
    n = math.hypot(dx, dy) or 1.0
    return dx / n, dy / n


def _vertex(fig: MathFigure, label: str) -> tuple[float, float]:
    x, y = fig.points[fig.labels.index(label)]
    return x, y


def _centroid(fig: MathFigure) -> tuple[float, float]:
    return sum(p[0] for p in fig.points) / 3, sum(p[1] for p in fig.points) / 3


def label_anchors(fig: MathFigure, width: int) -> dict[str, tuple[float, float]]:
    """Where each vertex letter is centred: outside the triangle, away from the centroid."""
    fs = label_size(width)
    cx, cy = _centroid(fig)
    out = {}
    for lab in fig.labels:
        vx, vy = _vertex(fig, lab)
        ux, uy = _unit(vx - cx, vy - cy)
        out[lab] = (vx + ux * fs * 0.85, vy + uy * fs * 0.85)
    return out


def _bisector_point(fig: MathFigure, label: str, dist: float) -> tuple[float, float]:
    vx, vy = _vertex(fig, label)
    others = [_vertex(fig, lab) for lab in fig.labels if lab != label]
    u1 = _unit(others[0][0] - vx, others[0][1] - vy)
    u2 = _unit(others[1][0] - vx, others[1][1] - vy)
    bx, by = _unit(u1[0] + u2[0], u1[1] + u2[1])
    cx, cy = _centroid(fig)
    d = min(dist, 0.8 * math.hypot(cx - vx, cy - vy))
    return vx + bx * d, vy + by * d


def _side_ends(fig: MathFigure, side: str) -> tuple[tuple[float, float], tuple[float, float]]:
    return _vertex(fig, side[0]), _vertex(fig, side[1])


def _draw_figure(draw: ImageDraw.ImageDraw, fig: MathFigure, width: int) -> None:
    fs = label_size(width)
    lw = max(1, width // 128)
    f = font(fs)
    draw.polygon([tuple(p) for p in fig.points], outline=INK, width=lw)
    for lab, (x, y) in label_anchors(fig, width).items():
        draw.text((x, y), lab, fill=INK, font=f, anchor="mm")
    cx, cy = _centroid(fig)
    vf = font(max(8, round(fs * 0.85)))
    for c in fig.conditions:
        if c.key not in fig.drawn:
            continue
        if c.kind == "angle":
            x, y = _bisector_point(fig, c.target, fs * 1.7)
            draw.text((x, y), f"{c.value}°", fill=INK, font=vf, anchor="mm")
        elif c.kind == "side":
            (x1, y1), (x2, y2) = _side_ends(fig, c.target)
            mx, my = (x1 + x2) / 2, (y1 + y2) / 2
            nx, ny = _unit(mx - cx, my - cy)
            draw.text(
                (mx + nx * fs * 0.75, my + ny * fs * 0.75), str(c.value), fill=INK, font=vf, anchor="mm"
            )
        elif c.kind == "equal":
            for side in c.target.split("="):
                (x1, y1), (x2, y2) = _side_ends(fig, side)
                mx, my = (x1 + x2) / 2, (y1 + y2) / 2
                px, py = _unit(-(y2 - y1), x2 - x1)
                h = fs * 0.35
                draw.line([(mx - px * h, my - py * h), (mx + px * h, my + py * h)], fill=INK, width=lw)
        elif c.kind == "right":
            vx, vy = _vertex(fig, c.target)
            a, b = (_vertex(fig, lab) for lab in fig.labels if lab != c.target)
            u1, u2 = _unit(a[0] - vx, a[1] - vy), _unit(b[0] - vx, b[1] - vy)
            s = fs * 0.6
            p1 = (vx + u1[0] * s, vy + u1[1] * s)
            p2 = (p1[0] + u2[0] * s, p1[1] + u2[1] * s)
            p3 = (vx + u2[0] * s, vy + u2[1] * s)
            draw.line([p1, p2, p3], fill=INK, width=lw)
    if fig.text_lines:
        ts = text_size(width)
        tf = font(ts)
        y = fig.figure_height
        for line in fig.text_lines:
            draw.text((max(2, width // 40), y), line, fill=INK, font=tf)
            y += line_height(ts)


def figure_regions(scene: Scene) -> list[tuple[list[int], str]]:
    """Boxes of a math figure: the triangle ("the triangle ABC") and each letter ("the label A")."""
    fig = scene.figure
    if fig is None:
        return []
    w, h = scene.width, scene.height
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in fig.points], outline=255, width=max(1, w // 128))
    out: list[tuple[list[int], str]] = []
    bbox = mask.getbbox()
    if bbox:
        out.append(([int(v) for v in bbox], "the triangle " + "".join(fig.labels)))
    f = font(label_size(w))
    for lab, (x, y) in label_anchors(fig, w).items():
        x1, y1, x2, y2 = ImageDraw.Draw(mask).textbbox((x, y), lab, font=f, anchor="mm")
        box = [max(0, math.floor(x1)), max(0, math.floor(y1)), min(w, math.ceil(x2)), min(h, math.ceil(y2))]
        if box[0] < box[2] and box[1] < box[3]:
            out.append((box, f"the label {lab}"))
    return out
