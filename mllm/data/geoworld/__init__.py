"""GeoWorld: a seeded, deterministic synthetic world of geometric primitives drawn with PIL.

One scene graph per image drives everything written about it: noisy and exact captions, region
boxes with unique phrases, multi-category instruction QA, and held-out benchmark sets in the
official MMVP, POPE, RefCOCO and MathVerse file layouts. The same seed gives byte-identical files.

Public API: `write_world` (the whole world to a folder, returns the manifest), `iter_text` (every
string of a written world, for tokenizer training), and the building blocks `sample_scene`,
`render`, `long_caption`, `short_caption`, `qa_pool`, `refer`; `write_held_out_at` (a larger MMVP
or POPE for a world already written).
"""

from .language import long_caption, qa_pool, refer, short_caption
from .render import render
from .scene import Scene, Shape, sample_scene, scene_from_dict
from .vocab import CATEGORIES, COLORS, SHAPES
from .writer import iter_text, write_held_out_at, write_world

__all__ = [
    "CATEGORIES",
    "COLORS",
    "SHAPES",
    "Scene",
    "Shape",
    "iter_text",
    "long_caption",
    "qa_pool",
    "refer",
    "render",
    "sample_scene",
    "scene_from_dict",
    "short_caption",
    "write_held_out_at",
    "write_world",
]
