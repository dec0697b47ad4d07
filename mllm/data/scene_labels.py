"""Per-patch targets from GeoWorld scene graphs, for the tower warm-up (`encoders.supervised`)."""

from __future__ import annotations

import json
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
    wins where boxes overlap); background patches get 0 for every attribute. `centre` is 1 on the patch
    holding each object's centre point."""
    gh, gw = grid
    w, h = scene["width"], scene["height"]
    out = {k: torch.zeros(gh * gw, dtype=torch.long) for k in targets.heads()}
    shapes = sorted(
        scene["shapes"], key=lambda s: (s["box"][2] - s["box"][0]) * (s["box"][3] - s["box"][1]), reverse=True
    )
    for r in range(gh):
        cy = (r + 0.5) * h / gh
        for c in range(gw):
            cx = (c + 0.5) * w / gw
            for s in shapes:  # largest first, so the smallest covering box is written last
                x1, y1, x2, y2 = s["box"]
                if x1 <= cx < x2 and y1 <= cy < y2:
                    i = r * gw + c
                    out["colour"][i] = targets.colours.index(s["color"]) + 1
                    out["shape"][i] = targets.shapes.index(s["kind"]) + 1
                    out["size"][i] = targets.sizes.index(s["size"]) + 1
                    o = s.get("orientation")
                    out["orientation"][i] = targets.orientations.index(o) + 1 if o else 0
    if "centre" in out:
        for s in shapes:
            r, c = min(int(s["y"] * gh / h), gh - 1), min(int(s["x"] * gw / w), gw - 1)
            out["centre"][r * gw + c] = 1
    return out


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
            labels = {k: torch.full((self.grid[0] * self.grid[1],), IGNORE) for k in self.targets.heads()}
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
