"""Detection targets of GeoWorld figures for the GeoGLIP-style encoder: boxes, junctions, boundaries.

The scene graph knows every primitive exactly, so no annotation is estimated:
- boxes: each shape's pixel-exact box (class = its kind), a math figure's triangle ("figure") and its
  vertex letters ("label");
- junctions: polygon vertices (shape outlines from `geometry.outline`; the figure's triangle corners);
- boundaries: polygon edges and circle outlines, rasterised with PIL like the image itself.
`geo_dataset` pairs them with the encoder's preprocessing: targets go through the same resize/crop
(`encoders.geo.crop_params`) as the pixels, so a box can never drift off its shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from encoders.geo import GEO_CLASSES, crop_params
from mllm.data.batch import Batch, start_batch
from mllm.data.conversations import sample_name
from mllm.data.images import ImageError, load_image, resolve_image
from mllm.data.records import read_records

from .geometry import outline
from .render import figure_regions
from .scene import Scene, scene_from_dict

__all__ = ["FigureTargets", "GeoFigureDataset", "collate_geo", "dense_targets", "figure_targets"]


@dataclass
class FigureTargets:
    """Everything the detector should find, in image pixels."""

    boxes: list[list[float]] = field(default_factory=list)  # [x1, y1, x2, y2]
    classes: list[int] = field(default_factory=list)
    junctions: list[tuple[float, float]] = field(default_factory=list)
    segments: list[tuple[float, float, float, float]] = field(default_factory=list)
    circles: list[tuple[float, float, float]] = field(default_factory=list)  # cx, cy, r

    def transformed(self, scale: float, left: float, top: float) -> FigureTargets:
        """The same targets after `x * scale - left`, `y * scale - top` (resize + crop)."""

        def pt(x: float, y: float) -> tuple[float, float]:
            return x * scale - left, y * scale - top

        return FigureTargets(
            boxes=[[*pt(b[0], b[1]), *pt(b[2], b[3])] for b in self.boxes],
            classes=list(self.classes),
            junctions=[pt(x, y) for x, y in self.junctions],
            segments=[(*pt(a, b), *pt(c, d)) for a, b, c, d in self.segments],
            circles=[(*pt(x, y), r * scale) for x, y, r in self.circles],
        )


def figure_targets(scene: Scene, classes: Sequence[str] = GEO_CLASSES) -> FigureTargets:
    """Targets of one scene (primitives and/or a labelled math figure)."""
    index = {c: i for i, c in enumerate(classes)}
    t = FigureTargets()
    for s in scene.shapes:
        t.boxes.append([float(v) for v in s.box])
        t.classes.append(index[s.kind])
        pts = outline(s.kind, s.x, s.y, s.radius, s.angle)
        if pts is None:
            t.circles.append((float(s.x), float(s.y), float(s.radius)))
            continue
        t.junctions.extend(pts)
        t.segments.extend((*pts[i], *pts[(i + 1) % len(pts)]) for i in range(len(pts)))
    fig = scene.figure
    if fig is not None:
        for box, phrase in figure_regions(scene):
            t.boxes.append([float(v) for v in box])
            t.classes.append(index["label" if phrase.startswith("the label") else "figure"])
        pts = [(float(x), float(y)) for x, y in fig.points]
        t.junctions.extend(pts)
        t.segments.extend((*pts[i], *pts[(i + 1) % len(pts)]) for i in range(len(pts)))
    return t


def _gaussian(heat: np.ndarray, cx: int, cy: int, sigma: float) -> None:
    """Splat exp(-d²/2σ²) at (cx, cy), keeping the max where peaks overlap (CenterNet's rule)."""
    h, w = heat.shape
    r = max(1, int(math.ceil(3 * sigma)))
    ys, xs = np.ogrid[-r : r + 1, -r : r + 1]
    g = np.exp(-(xs * xs + ys * ys) / (2 * sigma * sigma))
    x0, x1, y0, y1 = max(0, cx - r), min(w, cx + r + 1), max(0, cy - r), min(h, cy + r + 1)
    if x0 >= x1 or y0 >= y1:
        return
    patch = g[y0 - cy + r : y1 - cy + r, x0 - cx + r : x1 - cx + r]
    heat[y0:y1, x0:x1] = np.maximum(heat[y0:y1, x0:x1], patch)


def dense_targets(
    t: FigureTargets, size: int, num_classes: int, box_stride: int = 4, point_stride: int = 2
) -> dict[str, torch.Tensor]:
    """Targets on the encoder's grids: box centre heat-maps, size/offset, junction heat-map, edge map."""
    hb = size // box_stride
    heat = np.zeros((num_classes, hb, hb), np.float32)
    bsize = np.zeros((2, hb, hb), np.float32)
    offset = np.zeros((2, hb, hb), np.float32)
    mask = np.zeros((hb, hb), np.float32)
    for (x1, y1, x2, y2), c in zip(t.boxes, t.classes):
        x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(float(size), x2), min(float(size), y2)
        bw, bh = x2 - x1, y2 - y1
        if bw < 1 or bh < 1:
            continue  # cropped away
        fx, fy = (x1 + x2) / 2 / box_stride, (y1 + y2) / 2 / box_stride
        ix, iy = min(hb - 1, int(fx)), min(hb - 1, int(fy))
        _gaussian(heat[c], ix, iy, max(0.5, min(bw, bh) / box_stride / 6))
        heat[c, iy, ix] = 1.0
        bsize[:, iy, ix] = (math.log(bw), math.log(bh))
        offset[:, iy, ix] = (fx - ix, fy - iy)
        mask[iy, ix] = 1.0
    hp = size // point_stride
    junction = np.zeros((hp, hp), np.float32)
    for x, y in t.junctions:
        if 0 <= x < size and 0 <= y < size:
            ix, iy = int(x / point_stride), int(y / point_stride)
            _gaussian(junction, ix, iy, 1.0)
            junction[iy, ix] = 1.0
    edges = Image.new("L", (hp, hp), 0)
    draw = ImageDraw.Draw(edges)
    s = 1.0 / point_stride
    for x1, y1, x2, y2 in t.segments:
        draw.line([(x1 * s, y1 * s), (x2 * s, y2 * s)], fill=255, width=1)
    for cx, cy, r in t.circles:
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], outline=255, width=1)
    boundary = (np.asarray(edges, np.float32) > 0).astype(np.float32)
    return {
        "box_heat": torch.from_numpy(heat),
        "box_size": torch.from_numpy(bsize),
        "box_offset": torch.from_numpy(offset),
        "box_mask": torch.from_numpy(mask),
        "junction": torch.from_numpy(junction)[None],
        "boundary": torch.from_numpy(boundary)[None],
    }


class GeoFigureDataset(Dataset):
    """A GeoWorld `scenes.jsonl` (rows `{"image": ..., "scene": {...}}`) as detector training samples."""

    def __init__(
        self,
        jsonl: str | Path,
        image_root: str | Path | None,
        image_size: int,
        preprocess: Callable[[Sequence[Image.Image]], torch.Tensor],
        classes: Sequence[str] = GEO_CLASSES,
    ) -> None:
        self.path = Path(jsonl)
        self.root = Path(image_root) if image_root is not None else self.path.parent
        self.rows = read_records(self.path)
        self.image_size = image_size
        self.preprocess = preprocess
        self.classes = list(classes)
        for i, row in enumerate(self.rows):
            if not isinstance(row, dict) or "image" not in row or "scene" not in row:
                raise ValueError(f"{sample_name(self.path, i, row)}: a scene row needs 'image' and 'scene'")

    def __len__(self) -> int:
        return len(self.rows)

    def targets(self, i: int) -> FigureTargets:
        """Targets of row `i` in the encoder's input pixels."""
        scene = scene_from_dict(self.rows[i]["scene"])
        return figure_targets(scene, self.classes).transformed(
            *crop_params(scene.width, scene.height, self.image_size)
        )

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        try:
            image = load_image(resolve_image(self.root, row["image"]))
        except ImageError as e:
            raise ImageError(f"{self.path} row {i + 1}: {e}") from e
        dense = dense_targets(self.targets(i), self.image_size, len(self.classes))
        return {"id": str(row.get("id", i)), "pixel_values": self.preprocess([image]), **dense}


def collate_geo(items: list[dict[str, Any]]) -> Batch:
    items, batch = start_batch(items)  # GeoFigureDataset skips nothing: an unreadable figure raises
    batch["pixel_values"] = torch.cat([it["pixel_values"] for it in items])
    for key in items[0]:
        if key not in ("id", "pixel_values"):
            batch[key] = torch.stack([it[key] for it in items])
    return batch
