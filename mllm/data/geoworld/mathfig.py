"""Labelled-triangle problems: sampling, the geometry drawn to scale, and moving conditions.

A problem is a small set of facts (MathVerse's "implicit properties" such as AB = AC, drawn as tick
marks, and "essential conditions" such as angle A = 50°, drawn as values) plus a question with an
integer answer. The same problem can be laid out with any subset of facts drawn in the figure and
the rest stated in words, which is exactly what the MathVerse versions vary.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

from .fonts import label_size, line_height, text_size, wrap
from .scene import Condition, MathFigure, Scene

PROBLEMS: tuple[str, ...] = ("angle_sum", "isosceles", "right_triangle", "perimeter", "equilateral")
LABELS: list[str] = ["A", "B", "C"]
DESCRIPTION = "As shown in the figure, A, B and C are the vertices of triangle ABC."
_TRIPLES = ((3, 4, 5), (6, 8, 10), (5, 12, 13), (9, 12, 15), (8, 15, 17), (12, 16, 20))


def _angle(k: str, v: int) -> Condition:
    return Condition(
        key=f"angle:{k}", kind="angle", role="condition", target=k, value=v, text=f"angle {k} = {v}°"
    )


def _side(s: str, v: int) -> Condition:
    return Condition(key=f"side:{s}", kind="side", role="condition", target=s, value=v, text=f"{s} = {v}")


def _equal(*sides: str) -> Condition:
    return Condition(
        key="equal:" + "=".join(sides),
        kind="equal",
        role="property",
        target="=".join(sides),
        value=None,
        text=" = ".join(sides),
    )


def _right(k: str) -> Condition:
    return Condition(
        key=f"right:{k}", kind="right", role="property", target=k, value=90, text=f"angle {k} = 90°"
    )


def _from_sides(a: float, b: float, c: float) -> tuple[list[list[float]], dict[str, float]]:
    """Unit-space vertices A, B, C (y down, A above BC) from a=BC, b=CA, c=AB, and the angles."""
    ax = (c * c - b * b + a * a) / (2 * a)
    ay = math.sqrt(max(c * c - ax * ax, 1e-9))
    pts = [[ax, -ay], [0.0, 0.0], [a, 0.0]]
    angs = {
        "A": math.degrees(math.acos((b * b + c * c - a * a) / (2 * b * c))),
        "B": math.degrees(math.acos((a * a + c * c - b * b) / (2 * a * c))),
    }
    angs["C"] = 180.0 - angs["A"] - angs["B"]
    return pts, {k: round(v, 2) for k, v in angs.items()}


def _from_angles(a: float, b: float, c: float) -> tuple[list[list[float]], dict[str, float]]:
    """Vertices from the three angles (BC = 1, law of sines)."""
    s = math.sin
    r = 1.0 / s(math.radians(a))
    return _from_sides(1.0, r * s(math.radians(b)), r * s(math.radians(c)))


def sample_problem(rng: random.Random, problem: str | None = None) -> MathFigure:
    """A problem with geometry in unit space (not laid out yet; nothing drawn)."""
    problem = problem or rng.choice(PROBLEMS)
    if problem == "angle_sum":
        a = rng.randrange(30, 101, 5)
        b = rng.randrange(30, 151 - a, 5)
        c = 180 - a - b
        pts, angs = _from_angles(a, b, c)
        conds = [_angle("A", a), _angle("B", b)]
        question, answer, unit = "Find the measure of angle C.", str(c), "°"
    elif problem == "isosceles":
        a = rng.randrange(30, 101, 10)
        base = (180 - a) // 2
        pts, angs = _from_angles(a, base, base)
        conds = [_equal("AB", "AC"), _angle("A", a)]
        question, answer, unit = "Find the measure of angle B.", str(base), "°"
    elif problem == "right_triangle":
        p, q, h = rng.choice(_TRIPLES)
        if rng.random() < 0.5:
            p, q = q, p
        pts, angs = _from_sides(p, q, h)
        conds = [_right("C"), _side("AC", q), _side("BC", p)]
        question, answer, unit = "Find the length of AB.", str(h), ""
    elif problem == "perimeter":
        while True:
            a, b, c = (rng.randint(4, 12) for _ in range(3))
            pts, angs = _from_sides(a, b, c) if max(a, b, c) < a + b + c - max(a, b, c) else ([], {})
            if angs and min(angs.values()) >= 25:
                break
        conds = [_side("AB", c), _side("BC", a), _side("CA", b)]
        question, answer, unit = "Find the perimeter of triangle ABC.", str(a + b + c), ""
    elif problem == "equilateral":
        s = rng.randint(3, 15)
        pts, angs = _from_sides(1.0, 1.0, 1.0)
        conds = [_equal("AB", "BC", "CA"), _side("AB", s)]
        question, answer, unit = "Find the perimeter of triangle ABC.", str(3 * s), ""
    else:
        raise ValueError(f"unknown problem {problem!r}")
    if rng.random() < 0.5:  # mirror: B on the right
        pts = [[-x, y] for x, y in pts]
    turn = math.radians(rng.randrange(-20, 21, 5))  # a slight tilt, so figures are not all alike
    c, s_ = math.cos(turn), math.sin(turn)
    pts = [[x * c - y * s_, x * s_ + y * c] for x, y in pts]
    sides = _side_lengths(pts)
    return MathFigure(
        problem=problem,
        labels=list(LABELS),
        points=pts,
        angles=angs,
        sides=sides,
        description=DESCRIPTION,
        conditions=conds,
        question=question,
        answer=answer,
        unit=unit,
    )


def _side_lengths(pts: list[list[float]]) -> dict[str, float]:
    (ax, ay), (bx, by), (cx, cy) = pts
    d = math.dist
    return {
        "AB": round(d((ax, ay), (bx, by)), 3),
        "BC": round(d((bx, by), (cx, cy)), 3),
        "CA": round(d((cx, cy), (ax, ay)), 3),
    }


def conditions_sentence(conds: list[Condition]) -> str:
    """ "It is known that AB = AC and angle A = 40°." ('' for no conditions)."""
    if not conds:
        return ""
    texts = [c.text for c in conds]
    body = texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " and " + texts[-1]
    return f"It is known that {body}."


def stated(fig: MathFigure) -> list[Condition]:
    """Conditions not drawn in the figure, hence needed in the question text."""
    return [c for c in fig.conditions if c.key not in fig.drawn]


def math_scene(
    problem: MathFigure, width: int, drawn: list[str] | tuple[str, ...] = (), question_text: str = ""
) -> Scene:
    """Lay a problem out on a `width`-wide canvas with `drawn` facts in the figure.

    With `question_text` (Vision Only) the canvas grows downwards and the wrapped text is drawn
    under the figure; the figure itself keeps the same square area.
    """
    fs = label_size(width)
    pad = 1.6 * fs
    xs = [p[0] for p in problem.points]
    ys = [p[1] for p in problem.points]
    bw, bh = max(xs) - min(xs), max(ys) - min(ys)
    scale = min((width - 2 * pad) / bw, (width - 2 * pad) / bh)
    ox = (width - scale * bw) / 2 - scale * min(xs)
    oy = (width - scale * bh) / 2 - scale * min(ys)
    pts = [[round(ox + scale * x, 2), round(oy + scale * y, 2)] for x, y in problem.points]
    lines: list[str] = []
    height = width
    if question_text:
        ts = text_size(width)
        lines = wrap(question_text, ts, width - 2 * max(2, width // 40))
        height = width + len(lines) * line_height(ts) + max(2, width // 40)
    fig = replace(
        problem,
        points=pts,
        drawn=[c.key for c in problem.conditions if c.key in set(drawn)],
        text_lines=lines,
        figure_height=width,
    )
    return Scene(width=width, height=height, shapes=[], figure=fig)
