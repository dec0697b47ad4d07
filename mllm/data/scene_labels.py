"""Per-patch targets from GeoWorld scene graphs, for the tower warm-up (`encoders.supervised`)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from encoders.supervised import IGNORE, PatchTargets
from mllm.data.batch import Batch, Skip, skipped, start_batch
from mllm.data.geoworld.augment import AugmentConfig, render_augmented
from mllm.data.geoworld.sampling import stream
from mllm.data.geoworld.scene import scene_from_dict
from mllm.data.images import ImageError, load_image, resolve_image


def patch_labels(scene: dict, grid: tuple[int, int], targets: PatchTargets) -> dict[str, torch.Tensor]:
    """For each patch, the attributes of the object whose box holds the patch centre (smallest box
    wins where boxes overlap); background patches get 0 for every attribute. With `density`, the
    "density" map (float) says how much of each object's unit mass each patch holds (`_density`)."""
    gh, gw = grid
    w, h = scene["width"], scene["height"]
    shapes = scene["shapes"]
    # patch centres, row-major
    cy = ((torch.arange(gh, dtype=torch.float64) + 0.5) * h / gh).repeat_interleave(gw)
    cx = ((torch.arange(gw, dtype=torch.float64) + 0.5) * w / gw).repeat(gh)
    owner = torch.full((gh * gw,), -1, dtype=torch.long)  # which of `shapes` each patch shows
    for j in sorted(range(len(shapes)), key=lambda j: -_area(shapes[j]["box"])):
        x1, y1, x2, y2 = shapes[j]["box"]  # largest first, so the smallest covering box is written last
        owner[(x1 <= cx) & (cx < x2) & (y1 <= cy) & (cy < y2)] = j
    attrs = {
        "colour": [targets.colours.index(s["color"]) + 1 for s in shapes],
        "shape": [targets.shapes.index(s["kind"]) + 1 for s in shapes],
        "size": [targets.sizes.index(s["size"]) + 1 for s in shapes],
        "orientation": [
            targets.orientations.index(o) + 1 if (o := s.get("orientation")) else 0 for s in shapes
        ],
    }
    shown = owner >= 0
    out = {}
    for k in targets.heads():
        if k != "density":
            table = torch.tensor([0, *attrs[k]], dtype=torch.long)  # index 0: background
            out[k] = table[torch.where(shown, owner + 1, 0)]
    if targets.density:
        out["density"] = _density(scene, grid, owner)
    return out


def _area(box: list[int]) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def _density(scene: dict, grid: tuple[int, int], owner: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """Per patch, a share of each object's unit mass: a Gaussian (sigma in patches) around its centre
    point, integrated over each patch cell and kept on the patches the object owns, renormalised. Every
    object adds exactly 1, wherever the grid cuts it, so summing the map over the patches that show a
    word counts the objects with that word; the share depends on where the centre lies, not on the
    object's size or shape."""
    gh, gw = grid
    w, h = scene["width"], scene["height"]
    out = torch.zeros(gh * gw)
    for j, s in enumerate(scene["shapes"]):
        cy = _cell_mass(float(s["y"]), sigma * h / gh, h, gh)
        cx = _cell_mass(float(s["x"]), sigma * w / gw, w, gw)
        g = (cy[:, None] * cx[None, :]).flatten() * (owner == j)
        if g.sum() > 0:
            out += g / g.sum()
    return out


def _cell_mass(mu: float, sigma: float, extent: int, cells: int) -> torch.Tensor:
    """The mass of N(mu, sigma) in each of `cells` equal cells of [0, extent]."""
    edges = torch.arange(cells + 1, dtype=torch.float64) * extent / cells
    return (0.5 * (1 + torch.special.erf((edges - mu) / (sigma * math.sqrt(2))))).diff().float()


class SceneLabelDataset(Dataset):
    """`scenes.jsonl` (one scene graph per image) -> pixel values, per-patch labels, object count.

    Math figures (labelled triangles, no primitive list) carry no per-patch labels: their patches are
    ignored (IGNORE), not guessed, and their count target is ignored too.
    """

    def __init__(
        self,
        scenes_path: str | Path,
        image_root: str | Path | None,
        targets: PatchTargets,
        grid: tuple[int, int],
        preprocess: Callable[[Sequence[Image.Image]], torch.Tensor],
        skip_bad_samples: bool = False,
        augment: AugmentConfig | None = None,
    ):
        self.path = Path(scenes_path)
        # GeoWorld rows drawn again from their scene graphs (data.scene_augment); math figures stay files
        self.augment = augment
        self.root = Path(image_root) if image_root is not None else self.path.parent
        self.rows = [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]
        self.targets, self.grid, self.preprocess, self.skip = targets, grid, preprocess, skip_bad_samples

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        name = f"{self.path} line {i + 1} (id {row.get('id')!r})"
        try:
            if self.augment is not None and row["scene"].get("figure") is None:
                # one fixed drawing per row: the same sample for a resumed run, a new look for each row
                image = render_augmented(
                    scene_from_dict(row["scene"]), stream(0, "scene-augment", i), self.augment
                )
            else:
                image = load_image(resolve_image(self.root, row["image"]))
        except ImageError as e:
            if self.skip:
                return skipped(Skip(name, f"{name}: {e}"))
            raise
        scene = row["scene"]
        if scene.get("figure") is not None:
            labels = {  # the density map is float (shares of objects); the others are class indices
                k: torch.full(
                    (self.grid[0] * self.grid[1],),
                    IGNORE,
                    dtype=torch.float if k == "density" else torch.long,
                )
                for k in self.targets.heads()
            }
            count = IGNORE
        else:
            labels = patch_labels(scene, self.grid, self.targets)
            count = min(len(scene["shapes"]), self.targets.max_count)
        return {
            "id": row.get("id", str(i)),
            "pixel_values": self.preprocess([image]),
            "labels": labels,
            "count": count,
        }


def collate_scene_labels(items: list[dict[str, Any]]) -> Batch:
    items, batch = start_batch(items)
    if items:
        batch["pixel_values"] = torch.cat([it["pixel_values"] for it in items])
        batch["labels"] = {k: torch.stack([it["labels"][k] for it in items]) for k in items[0]["labels"]}
        batch["count"] = torch.tensor([it["count"] for it in items], dtype=torch.long)
    return batch
