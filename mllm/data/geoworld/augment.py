"""Training-time image augmentation of GeoWorld scenes that never changes an answer.

GeoWorld's renderer draws exact named colours, aliased edges and integer centres at the scene's
size; pictures people bring are drawn at other resolutions, anti-aliased, in a shade *near* a
named colour, off any placement grid and often JPEG-coded. `render_augmented` draws the same scene
graph with that variety, so a model trained on it can learn what the answers depend on (hue, shape,
count, layout) instead of the renderer's exact pixels. Every transform is chosen so that the scene
graph stays the truth for every question GeoWorld asks:

- shade: each object's fill is its named colour plus a per-channel offset, kept only when the shade
  is still unambiguously nearest its own colour (`shade_color`);
- resolution / anti-aliasing: the scene is drawn at k× its size with sub-pixel-exact coordinates and
  downsampled with a random PIL filter (k = 3.5 at 64 px is a 224-px picture going through a 64-px
  image processor);
- sub-pixel centre offsets (< 1 px, never across a 3 × 3 region boundary) and a small polygon
  rotation (a few degrees: "pointing up" stays up, a square stays a square);
- a near-white background tint, an occasional mild blur and an occasional JPEG re-encode (MMVP's
  images are JPEG q95).

Colour distance is CIELAB ΔE*76 (sRGB, D65): it is perceptual enough to call CSS "orange"
(255, 165, 0) orange and dodger blue (30, 144, 255) blue, where plain Euclidean RGB calls them
yellow and cyan; blue and purple are close in it, which the margin accounts for.

Pixel-exact boxes (`Shape.box`) describe `render(scene)`; augmented edges can move by about a pixel.
Math figures (`scene.figure`) are returned exactly as `render` draws them: their text must stay
legible and their labels placed where `figure_regions` says.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

from .geometry import outline
from .render import render
from .scene import Scene, region_of
from .vocab import COLORS

__all__ = ["RESAMPLE", "AugmentConfig", "color_distances", "nearest_color", "render_augmented", "shade_color"]

RGB = tuple[int, int, int]

#: Downsampling filters by name (names, not enums, so a config round-trips through YAML/JSON).
RESAMPLE: dict[str, Image.Resampling] = {
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,  # what HF image processors use to shrink a user's picture
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass
class AugmentConfig:
    """How `render_augmented` varies a scene's pixels. `p == 0` turns it off (exactly `render`).

    Defaults cover a 224-px anti-aliased user drawing in a nearby shade seen through a 64-px tower;
    every component is switched off by its zero value (`shade=0`, `supersample=(1.0,)`, `subpixel=0`,
    `rotate=0`, `background=0`, `blur_p=0`, `jpeg_p=0`), and with all of them off the output equals
    `render(scene)` byte for byte, whatever `p` is.
    """

    #: Probability that a sample is augmented at all (the rest are exactly `render(scene)`, so the
    #: generator's own pixels stay in the training mix).
    p: float = 0.8
    #: Maximum per-channel offset (0-255 units) of an object's fill from its named colour.
    shade: float = 40.0
    #: A shade is kept only if its ΔE to every other named colour is ≥ (1 + shade_margin) × its ΔE to
    #: its own; otherwise it is redrawn (and after a few misses the named colour is used).
    shade_margin: float = 1.0
    #: Render scales k (drawn at k × size, then downsampled); 1.0 is the aliased GeoWorld look.
    supersample: tuple[float, ...] = (1.0, 2.0, 3.5, 4.0)
    #: Downsampling filters to choose from (keys of `RESAMPLE`).
    resample: tuple[str, ...] = ("box", "bilinear", "bicubic", "lanczos")
    #: Maximum centre offset per axis, in scene pixels (only when k > 1; never crosses a region boundary).
    subpixel: float = 0.5
    #: Maximum polygon rotation in degrees, either way (circles are unaffected).
    rotate: float = 6.0
    #: Maximum darkening (0-255 units) per background channel: white-ish, never grey.
    background: int = 6
    #: Probability of a Gaussian blur, and its maximum radius in scene pixels.
    blur_p: float = 0.2
    blur: float = 0.6
    #: Probability of a JPEG re-encode (4:4:4, so small shapes keep their hue), and its quality range.
    jpeg_p: float = 0.3
    jpeg_quality: tuple[int, int] = (70, 95)

    def __post_init__(self) -> None:
        for name in ("p", "blur_p", "jpeg_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"AugmentConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.shade < 0 or self.shade_margin < 0 or self.subpixel < 0 or self.rotate < 0 or self.blur < 0:
            raise ValueError("AugmentConfig: shade, shade_margin, subpixel, rotate and blur must be ≥ 0")
        if not 0 <= self.background <= 32:
            raise ValueError(
                f"AugmentConfig.background must be in [0, 32] (white-ish), got {self.background}"
            )
        self.supersample = tuple(float(k) for k in self.supersample)
        if not self.supersample or any(k < 1.0 for k in self.supersample):
            raise ValueError(f"AugmentConfig.supersample needs scales ≥ 1, got {self.supersample}")
        self.resample = tuple(self.resample)
        unknown = [r for r in self.resample if r not in RESAMPLE]
        if not self.resample or unknown:
            raise ValueError(f"AugmentConfig.resample must be a non-empty subset of {sorted(RESAMPLE)}")
        lo, hi = self.jpeg_quality
        self.jpeg_quality = (int(lo), int(hi))
        if not 1 <= lo <= hi <= 100:
            raise ValueError(f"AugmentConfig.jpeg_quality must be 1 ≤ lo ≤ hi ≤ 100, got {self.jpeg_quality}")


# ------------------------------------------------------------------------------------------------ colour


def _lab(rgb: tuple[float, float, float]) -> tuple[float, float, float]:
    """sRGB (0-255) → CIELAB (D65)."""

    def lin(u: float) -> float:
        u /= 255.0
        return u / 12.92 if u <= 0.04045 else ((u + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(v) for v in rgb)
    x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883

    def f(t: float) -> float:
        return t ** (1.0 / 3.0) if t > 216.0 / 24389.0 else (24389.0 / 27.0 * t + 16.0) / 116.0

    fx, fy, fz = f(x), f(y), f(z)
    return 116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)


_NAMED_LAB: dict[str, tuple[float, float, float]] = {name: _lab(rgb) for name, rgb in COLORS.items()}


def color_distances(rgb: tuple[float, float, float]) -> dict[str, float]:
    """CIELAB ΔE*76 from `rgb` to every named colour (the one distance this module judges shades by)."""
    lab = _lab(rgb)
    return {name: math.dist(lab, ref) for name, ref in _NAMED_LAB.items()}


def nearest_color(rgb: tuple[float, float, float]) -> str:
    """The named colour a shade reads as: the nearest by ΔE*76."""
    d = color_distances(rgb)
    return min(d, key=d.__getitem__)


def _clearly(rgb: RGB, name: str, margin: float) -> bool:
    d = color_distances(rgb)
    own = d.pop(name)
    return min(d.values()) >= (1.0 + margin) * own


def shade_color(name: str, rng: random.Random, shade: float, margin: float, tries: int = 12) -> RGB:
    """A random shade of named colour `name` that still reads clearly as `name`.

    Per-channel uniform offsets in [-shade, shade], clipped to 0-255, redrawn until the shade is
    (1 + margin) times nearer its own colour than any other (ΔE*76); after `tries` misses the exact
    named colour, so the answer "what colour is it" can never change. `shade == 0` uses no RNG draws.
    """
    base = COLORS[name]
    if shade <= 0:
        return base
    for _ in range(tries):
        r, g, b = (min(255, max(0, round(c + rng.uniform(-shade, shade)))) for c in base)
        if _clearly((r, g, b), name, margin):
            return r, g, b
    return base


# ------------------------------------------------------------------------------------------------ drawing


def _offset(
    rng: random.Random, scene: Scene, x: float, y: float, region: str, limit: float
) -> tuple[float, float]:
    """A sub-pixel centre offset that keeps the object in its 3 × 3 region (position answers hold)."""
    if limit <= 0:
        return 0.0, 0.0
    dx, dy = rng.uniform(-limit, limit), rng.uniform(-limit, limit)
    if region_of(x + dx, y + dy, scene.width, scene.height) != region:
        return 0.0, 0.0
    return dx, dy


def render_augmented(scene: Scene, rng: random.Random, cfg: AugmentConfig | None = None) -> Image.Image:
    """Draw `scene` (RGB, scene.width × scene.height) with answer-preserving pixel variety.

    Deterministic given the RNG state. Math figures, `cfg.p == 0` and the `1 - p` unaugmented share
    return `render(scene)` unchanged.
    """
    cfg = cfg or AugmentConfig()
    if scene.figure is not None or cfg.p <= 0 or rng.random() >= cfg.p:
        return render(scene)
    w, h = scene.width, scene.height
    k = rng.choice(cfg.supersample)
    big_w, big_h = max(w, round(k * w)), max(h, round(k * h))
    kx, ky = big_w / w, big_h / h
    tint = rng.randint(0, cfg.background) if cfg.background > 0 else 0
    bg = tuple(max(0, c - tint) for c in scene.background)
    img = Image.new("RGB", (big_w, big_h), bg)
    draw = ImageDraw.Draw(img)
    # PIL's two conventions, each kept at the big scale so shapes land where `render` puts them:
    # polygon coordinates treat pixel i as the unit square [i, i+1), so vertices simply scale by k;
    # an ellipse's box is inclusive of pixel centres, so pixel c's centre maps to k*c + (k-1)/2.
    ox, oy = (kx - 1.0) / 2.0, (ky - 1.0) / 2.0
    for s in scene.shapes:
        fill = shade_color(s.color, rng, cfg.shade, cfg.shade_margin)
        dx, dy = _offset(rng, scene, s.x, s.y, s.region, cfg.subpixel) if big_w > w else (0.0, 0.0)
        x, y = s.x + dx, s.y + dy
        if s.kind == "circle":
            # `render`'s ellipse [x-r, x+r] fills pixel centres x-r..x+r, i.e. a disc of radius r + ½.
            rx, ry = kx * (s.radius + 0.5) - 0.5, ky * (s.radius + 0.5) - 0.5
            cx, cy = kx * x + ox, ky * y + oy
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
            continue
        pts = outline(s.kind, x, y, s.radius, s.angle) or []
        turn = rng.uniform(-cfg.rotate, cfg.rotate) if cfg.rotate > 0 else 0.0
        if turn:
            c, sn = math.cos(math.radians(turn)), math.sin(math.radians(turn))
            pts = [(x + (px - x) * c - (py - y) * sn, y + (px - x) * sn + (py - y) * c) for px, py in pts]
        draw.polygon([(kx * px, ky * py) for px, py in pts], fill=fill)
    if (big_w, big_h) != (w, h):
        img = img.resize((w, h), RESAMPLE[rng.choice(cfg.resample)])
    if cfg.blur_p > 0 and rng.random() < cfg.blur_p and cfg.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, cfg.blur)))
    if cfg.jpeg_p > 0 and rng.random() < cfg.jpeg_p:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=rng.randint(*cfg.jpeg_quality), subsampling=0)
        buf.seek(0)
        with Image.open(buf) as coded:
            img = coded.convert("RGB")
    return img
