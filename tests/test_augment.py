"""GeoWorld's training-time augmentation: deterministic, off means `render`, and never changes an answer.

The answer checks read the augmented pixels back against the scene graph: every object's centre
pixel must still read as its named colour, nothing may appear far from any object, and shades must
stay clearly nearest their own colour.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from mllm.data.geoworld import render, sample_scene
from mllm.data.geoworld.augment import (
    AugmentConfig,
    color_distances,
    nearest_color,
    render_augmented,
    shade_color,
)
from mllm.data.geoworld.mathfig import math_scene, sample_problem
from mllm.data.geoworld.vocab import COLORS

#: Every component off (shade 0, scale 1, no offsets, rotation, tint, blur or JPEG): must be `render`.
ALL_OFF = AugmentConfig(
    p=1.0, shade=0, supersample=(1.0,), subpixel=0, rotate=0, background=0, blur_p=0, jpeg_p=0
)
ALWAYS = AugmentConfig(p=1.0)
#: The harshest defaults-derived setting: always blurred (at the maximum radius) and JPEG-coded at the floor.
HARSH = AugmentConfig(p=1.0, blur_p=1.0, jpeg_p=1.0, jpeg_quality=(70, 70))


def _scenes(n: int, size: int = 64, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [sample_scene(rng, size) for _ in range(n)]


def test_deterministic_given_the_rng() -> None:
    scenes = _scenes(40)
    a = [render_augmented(s, random.Random(7), ALWAYS).tobytes() for s in scenes]
    b = [render_augmented(s, random.Random(7), ALWAYS).tobytes() for s in scenes]
    assert a == b
    rng1, rng2 = random.Random(11), random.Random(11)  # one stream over many scenes, as a loader uses it
    assert [render_augmented(s, rng1).tobytes() for s in scenes] == [
        render_augmented(s, rng2).tobytes() for s in scenes
    ]
    c = [render_augmented(s, random.Random(8), ALWAYS).tobytes() for s in scenes]
    assert sum(x != y for x, y in zip(a, c)) > 30  # the seed matters


@pytest.mark.parametrize("cfg", [AugmentConfig(p=0.0), ALL_OFF], ids=["p0", "all_off"])
def test_disabled_equals_render_byte_for_byte(cfg: AugmentConfig) -> None:
    for seed, s in enumerate(_scenes(60, seed=3)):
        assert render_augmented(s, random.Random(seed), cfg).tobytes() == render(s).tobytes()


def test_unaugmented_share_and_figures_are_render() -> None:
    scenes = _scenes(200, seed=5)
    rng = random.Random(0)
    same = sum(
        render_augmented(s, rng, AugmentConfig(p=0.5)).tobytes() == render(s).tobytes() for s in scenes
    )
    assert 60 < same < 140  # about half are left exactly as rendered
    prng = random.Random(1)
    for i in range(6):
        fig = sample_problem(prng)
        scene = math_scene(
            fig, 96, drawn=[c.key for c in fig.conditions][: i % 3], question_text="Find x." if i % 2 else ""
        )
        assert render_augmented(scene, random.Random(i), HARSH).tobytes() == render(scene).tobytes()


def test_shades_keep_their_name() -> None:
    cfg = AugmentConfig()
    for name, base in COLORS.items():
        rng = random.Random(name)
        shades = [shade_color(name, rng, cfg.shade, cfg.shade_margin) for _ in range(2000)]
        moved = [c for c in shades if c != base]
        assert len(moved) > 1900, name  # the fallback to the exact colour is rare
        assert max(max(abs(a - b) for a, b in zip(c, base)) for c in moved) <= cfg.shade + 0.5
        for c in set(shades):
            assert all(0 <= v <= 255 for v in c)
            assert nearest_color(c) == name, (name, c)
            d = color_distances(c)
            own = d.pop(name)
            assert min(d.values()) >= (1 + cfg.shade_margin) * own, (name, c)
    assert shade_color("red", random.Random(0), 0.0, 1.0) == COLORS["red"]


def test_named_colours_are_their_own_nearest() -> None:
    for name, rgb in COLORS.items():
        assert nearest_color(rgb) == name
        assert color_distances(rgb)[name] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("size", [32, 64, 96])
def test_output_size_and_mode(size: int) -> None:
    for k in (1.0, 2.0, 3.5, 4.0):
        cfg = AugmentConfig(p=1.0, supersample=(k,), jpeg_p=0.5, blur_p=0.5)
        for seed, s in enumerate(_scenes(8, size=size, seed=size)):
            img = render_augmented(s, random.Random(seed), cfg)
            assert img.mode == "RGB" and img.size == (s.width, s.height)


@pytest.mark.parametrize(
    "cfg",
    [ALWAYS, HARSH, AugmentConfig(p=1.0, supersample=(3.5,), resample=("bicubic",))],
    ids=["defaults", "harsh", "224px_bicubic"],
)
def test_objects_stay_where_the_scene_says(cfg: AugmentConfig) -> None:
    rng = random.Random(1)
    for s in _scenes(150, seed=9):
        img = np.asarray(render_augmented(s, rng, cfg), dtype=np.int32)
        h, w, _ = img.shape
        covered = np.zeros((h, w), dtype=bool)
        for sh in s.shapes:
            # every sampled object has radius ≥ 7 px at 64 px: its centre pixel is solid fill
            assert nearest_color(tuple(img[sh.y, sh.x])) == sh.color, (sh, tuple(img[sh.y, sh.x]))
            x1, y1, x2, y2 = sh.box
            covered[max(0, y1 - 3) : y2 + 3, max(0, x1 - 3) : x2 + 3] = True
        # away from every object (3 px beyond its box: rotation + offset move corners ≤ 2 px) the picture is still white-ish background
        # (JPEG rings a little inside an object's 8 × 8 blocks: pale, never a colour)
        far = img[~covered]
        assert far.min() >= 180 and far.mean() >= 245, (int(far.min()), float(far.mean()))
        assert (np.median(far, axis=0) >= 255 - cfg.background - 2).all()  # the tint is white-ish


def test_augmented_pixels_actually_vary() -> None:
    """Anti-aliasing makes intermediate edge colours and shades move fills: the point of the module."""
    s = _scenes(1, seed=2)[0]
    base = np.asarray(render(s), dtype=np.int32)
    aa = np.asarray(
        render_augmented(
            s,
            random.Random(0),
            AugmentConfig(p=1.0, supersample=(4.0,), shade=0, jpeg_p=0, blur_p=0, background=0),
        )
    )
    named = {tuple(c) for c in COLORS.values()} | {(255, 255, 255)}
    colours_base = {tuple(int(v) for v in p) for p in base.reshape(-1, 3)}
    colours_aa = {tuple(int(v) for v in p) for p in aa.reshape(-1, 3)}
    assert colours_base <= named
    assert len(colours_aa - named) > 10


@pytest.mark.parametrize(
    "bad",
    [
        dict(p=1.5),
        dict(supersample=(0.5,)),
        dict(supersample=()),
        dict(resample=("nearest",)),
        dict(jpeg_quality=(90, 80)),
        dict(background=100),
        dict(shade=-1.0),
    ],
)
def test_bad_config_is_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        AugmentConfig(**bad)


def test_object_centroids_do_not_move() -> None:
    """Position answers hold: each object's ink centroid stays within about a pixel of `render`'s.

    `render`'s own aliasing is up to ½ px off the true shape, and the sub-pixel offset (≤ ½ px) and
    rotation add to that; a half-pixel convention slip in the supersampled drawing would show here.
    """
    rng = random.Random(4)
    yy, xx = np.mgrid[0:64, 0:64]
    shifts = []
    for s in _scenes(150, seed=12):
        base = 255 - np.asarray(render(s), dtype=np.float64).mean(-1)
        aug = 255 - np.asarray(render_augmented(s, rng, ALWAYS), dtype=np.float64).mean(-1)
        for sh in s.shapes:
            disc = (xx - sh.x) ** 2 + (yy - sh.y) ** 2 <= (sh.radius + 1) ** 2  # no other object reaches in
            cb = [float((base * disc * g).sum() / (base * disc).sum()) for g in (xx, yy)]
            ca = [float((aug * disc * g).sum() / (aug * disc).sum()) for g in (xx, yy)]
            shifts.append(max(abs(cb[0] - ca[0]), abs(cb[1] - ca[1])))
    assert float(np.median(shifts)) < 0.45 and max(shifts) < 1.25, (float(np.median(shifts)), max(shifts))
