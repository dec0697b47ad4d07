"""MMVP-style pairs in the official layout: two scenes that differ in exactly one visual pattern,
asked the same question, with different correct answers.

Written files (under `mmvp/`): `Questions.csv` (columns exactly `Index,Question,Options,Correct
Answer`; rows 2k-1 and 2k form pair k), `MMVP Images/<Index>.jpg` (JPEG, the space in the folder
name as in the official release). Two side files that are NOT part of the official layout:
`patterns.json` ({Index: pattern}) and `scenes.jsonl` (the scene graph of every image), so a
report can break accuracy down by pattern and a test can check each pair's single difference.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from pathlib import Path

from .files import write_csv, write_json, write_jsonl
from .render import render, save_jpeg
from .sampling import pixel_key, stream
from .scene import (
    Scene,
    Shape,
    fits,
    make_shape,
    moved,
    pick_color,
    pick_kind,
    place,
    radius_for,
    random_angle,
)
from .vocab import COLOR_NAMES, DIRECTIONS, LIES, PLURALS, SHAPES, SIZES, UPRIGHT, with_article

PATTERNS: tuple[str, ...] = (
    "orientation",
    "count",
    "color",
    "position",
    "presence",
    "size",
    "relative_position",
    "shape",
)
HEADER = ["Index", "Question", "Options", "Correct Answer"]

Pair = tuple[Scene, Scene, str, str, str]  # scene A, scene B, question, answer A, answer B


def _add(
    rng: random.Random,
    shapes: list[Shape],
    size: int,
    kind: str,
    color: str,
    size_name: str,
    angle: int | None = None,
) -> bool:
    """Place one more shape at a random free spot; False when there is none."""
    centre = place(rng, radius_for(size_name, size), shapes, size, size)
    if centre is None:
        return False
    a = random_angle(rng, kind) if angle is None else angle
    shapes.append(make_shape(kind, color, size_name, centre[0], centre[1], a, size, size))
    return True


def _others(
    rng: random.Random,
    shapes: list[Shape],
    size: int,
    n: int,
    avoid_kinds: Collection[str],
    avoid_colors: Collection[str] = (),
) -> bool:
    """Add `n` distractors whose kinds (and colours, if asked) differ from the target's."""
    kinds = tuple(k for k in SHAPES if k not in avoid_kinds)
    colors = tuple(c for c in COLOR_NAMES if c not in avoid_colors)
    used: set[str] = set()
    for _ in range(n):
        kind = pick_kind(rng, tuple(k for k in kinds if k not in used))
        used.add(kind)
        if not _add(rng, shapes, size, kind, pick_color(rng, colors), rng.choice(SIZES)):
            return False
    return True


def _scene(shapes: list[Shape], size: int) -> Scene:
    return Scene(width=size, height=size, shapes=shapes)


def _pair(rng: random.Random, pattern: str, size: int) -> Pair | None:
    """One candidate pair for `pattern`, or None if this draw does not work out (caller retries)."""
    shapes: list[Shape] = []
    if pattern == "orientation":
        kind = rng.choice(("triangle", "arrow", "rectangle"))
        angles = list(LIES) if kind == "rectangle" else list(DIRECTIONS)
        a1, a2 = rng.sample(angles, 2)
        if not _add(rng, shapes, size, kind, pick_color(rng), rng.choice(SIZES), a1):
            return None
        if not _others(rng, shapes, size, rng.randint(0, 2), {kind}):
            return None
        b = [moved(shapes[0], size, size, angle=a2)] + shapes[1:]
        q = (
            f"Is the {kind} horizontal or vertical?"
            if kind == "rectangle"
            else f"Which direction is the {kind} pointing?"
        )
        return _scene(shapes, size), _scene(b, size), q, shapes[0].orientation or "", b[0].orientation or ""
    if pattern in ("color", "size", "position"):
        kind = pick_kind(rng)
        size_name = "small" if pattern == "size" else rng.choice(SIZES)
        if not _add(rng, shapes, size, kind, pick_color(rng), size_name):
            return None
        if not _others(rng, shapes, size, rng.randint(0, 2), {kind}):
            return None
        t = shapes[0]
        if pattern == "color":
            new = moved(t, size, size, color=rng.choice([c for c in COLOR_NAMES if c != t.color]))
            q, a, b_ans = f"What color is the {kind}?", t.color, new.color
        elif pattern == "size":
            new = moved(t, size, size, size="large")
            q, a, b_ans = f"Is the {kind} small or large?", "small", "large"
        else:
            if abs(t.x - (size - 1) / 2) < 0.15 * size:
                return None
            new = moved(t, size, size, x=size - 1 - t.x)
            q = f"Is the {kind} on the left or the right side of the image?"
            a, b_ans = ("left", "right") if t.x < size / 2 else ("right", "left")
        if not fits(new.x, new.y, new.radius, shapes[1:], size, size):
            return None
        return _scene(shapes, size), _scene([new] + shapes[1:], size), q, a, b_ans
    if pattern == "relative_position":
        k1, k2 = rng.sample(SHAPES, 2)
        for k in (k1, k2):
            if not _add(rng, shapes, size, k, pick_color(rng), rng.choice(SIZES)):
                return None
        s1, s2 = shapes
        if abs(s1.x - s2.x) < s1.radius + s2.radius:
            return None
        if not _others(rng, shapes, size, rng.randint(0, 1), {k1, k2}):
            return None
        n1 = moved(s1, size, size, x=s2.x, y=s2.y)
        n2 = moved(s2, size, size, x=s1.x, y=s1.y)
        rest = shapes[2:]
        if not (
            fits(n1.x, n1.y, n1.radius, [n2, *rest], size, size)
            and fits(n2.x, n2.y, n2.radius, rest, size, size)
        ):
            return None
        q = f"Is the {k1} to the left or to the right of the {k2}?"
        a = "left" if s1.x < s2.x else "right"
        return _scene(shapes, size), _scene([n1, n2, *rest], size), q, a, "right" if a == "left" else "left"
    if pattern == "count":
        kind = pick_kind(rng)
        m = rng.randint(1, 3)
        for _ in range(m):
            if not _add(rng, shapes, size, kind, pick_color(rng), "small"):
                return None
        if not _others(rng, shapes, size, rng.randint(0, 1), {kind}):
            return None
        b = list(shapes)
        if not _add(rng, b, size, kind, pick_color(rng), "small"):
            return None
        return (
            _scene(shapes, size),
            _scene(b, size),
            f"How many {PLURALS[kind]} are there?",
            str(m),
            str(m + 1),
        )
    if pattern == "presence":
        kind, color = pick_kind(rng), pick_color(rng)
        if not _add(rng, shapes, size, kind, color, rng.choice(SIZES)):
            return None
        for _ in range(rng.randint(1, 2)):  # near misses: same kind or same colour, never both
            if rng.random() < 0.5:
                k, c = kind, rng.choice([c for c in COLOR_NAMES if c != color])
            else:
                k, c = rng.choice([k for k in SHAPES if k != kind]), color
            if not _add(rng, shapes, size, k, c, rng.choice(SIZES)):
                return None
        q = f"Is there {with_article(color + ' ' + kind)} in the image?"
        return _scene(shapes, size), _scene(shapes[1:], size), q, "yes", "no"
    if pattern == "shape":
        k1, k2 = rng.sample(UPRIGHT, 2)
        color = pick_color(rng)
        if not _add(rng, shapes, size, k1, color, rng.choice(SIZES)):
            return None
        if not _others(rng, shapes, size, rng.randint(0, 2), set(), {color}):
            return None
        new = moved(shapes[0], size, size, kind=k2)
        return (
            _scene(shapes, size),
            _scene([new] + shapes[1:], size),
            f"What shape is the {color} object?",
            k1,
            k2,
        )
    raise ValueError(f"unknown MMVP pattern {pattern!r}")


def write_mmvp(out: Path, seed: int, pairs: int, size: int, seen: set[bytes]) -> list[list[str]]:
    """Write the MMVP set for `pairs` pairs (patterns cycled in order); return the CSV rows."""
    root = out / "mmvp"
    img_dir = root / "MMVP Images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows: list[list[str]] = []
    patterns: dict[str, str] = {}
    scenes: list[dict] = []
    for k in range(pairs):
        pattern = PATTERNS[k % len(PATTERNS)]
        for attempt in range(500):
            rng = stream(seed, "mmvp", k, attempt)
            pair = _pair(rng, pattern, size)
            if pair is None:
                continue
            a, b, question, ans_a, ans_b = pair
            img_a, img_b = render(a), render(b)
            ka, kb = pixel_key(img_a), pixel_key(img_b)
            if ans_a != ans_b and ka != kb and ka not in seen and kb not in seen:
                break
        else:
            raise RuntimeError(f"could not draw MMVP pair {k} ({pattern})")
        seen.update((ka, kb))
        if rng.random() < 0.5:
            a, b, ans_a, ans_b, img_a, img_b = b, a, ans_b, ans_a, img_b, img_a
        options = [ans_a, ans_b]
        rng.shuffle(options)
        opt_text = f"(a) {options[0]} (b) {options[1]}"
        for j, (scene, img, ans) in enumerate(((a, img_a, ans_a), (b, img_b, ans_b))):
            index = 2 * k + 1 + j
            save_jpeg(img, img_dir / f"{index}.jpg")
            letter = "(a)" if ans == options[0] else "(b)"
            rows.append([str(index), question, opt_text, letter])
            patterns[str(index)] = pattern
            scenes.append(
                {
                    "index": index,
                    "image": f"MMVP Images/{index}.jpg",
                    "pattern": pattern,
                    "scene": scene.to_dict(),
                }
            )
    write_csv(root / "Questions.csv", HEADER, rows)
    write_json(root / "patterns.json", patterns)
    write_jsonl(root / "scenes.jsonl", scenes)
    return rows
