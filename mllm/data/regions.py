"""CLOC's data: GeoWorld captions.jsonl (the CLIP pair) joined by id with regions.jsonl (boxes + phrases).

`read_regions` reads the writer's region file (boxes normalised to the image), `RegionCaptionDataset`
adds up to M sampled regions to each caption sample, and `RegionCaptionCollator` flattens the batch's
regions into the tensors `encoders.cloc.ClocModel.forward` takes (`region_*`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from mllm.data.batch import Batch, is_skipped
from mllm.data.captions import CaptionCollator, CaptionDataset
from mllm.data.records import DataError


def read_regions(path: Path) -> dict[str, dict[str, Any]]:
    """id -> {"width", "height", "boxes": [[x1, y1, x2, y2] normalised], "phrases"}.

    A bad row is an error naming its line."""
    out: dict[str, dict[str, Any]] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        where = f"{path} line {i + 1}"
        try:
            row = json.loads(line)
            w, h = float(row["width"]), float(row["height"])
            boxes, phrases = [], []
            for r in row["regions"]:
                x1, y1, x2, y2 = (float(v) for v in r["box"])
                if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
                    raise ValueError(f"box {r['box']} is not inside the {w:g}x{h:g} image")
                if not isinstance(r["phrase"], str) or not r["phrase"].strip():
                    raise ValueError("empty phrase")
                boxes.append([x1 / w, y1 / h, x2 / w, y2 / h])
                phrases.append(r["phrase"])
            out[str(row["id"])] = {"width": w, "height": h, "boxes": boxes, "phrases": phrases}
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where}: {type(e).__name__}: {e}") from e
    return out


def sample_regions(n: int, m: int, generator: torch.Generator | None = None) -> list[int]:
    """Up to m of n region indices without replacement, in their original order."""
    if n <= m:
        return list(range(n))
    return sorted(torch.randperm(n, generator=generator)[:m].tolist())


class RegionCaptionDataset(Dataset):
    """GeoWorld captions (the CLIP pair) with the image's region boxes and phrases (CLOC's extra signal).

    Up to M regions per fetch, drawn with a generator seeded from the global torch RNG (which the engine
    seeds and restores on resume). Images must be square: the boxes are normalised to the image and the
    tower's processor must see all of it (no centre crop cutting boxes off).
    """

    def __init__(
        self,
        captions: str | Path,
        regions: str | Path,
        image_root: str | Path | None,
        preprocess: Callable[[Sequence[Image.Image]], torch.Tensor],
        caption: str = "long",
        regions_per_image: int = 4,
        skip_bad_samples: bool = False,
    ):
        self.captions = CaptionDataset(
            captions, image_root, preprocess, caption, skip_bad_samples=skip_bad_samples
        )
        self.regions_path = Path(regions)
        if not self.regions_path.is_file():
            raise FileNotFoundError(f"CLOC needs region boxes: {self.regions_path} does not exist")
        self.regions = read_regions(self.regions_path)
        self.m = regions_per_image
        for i, row in enumerate(self.captions.rows):
            rid = str(row.get("id", i)) if isinstance(row, dict) else None
            reg = self.regions.get(rid) if rid is not None else None
            if reg is not None and reg["width"] != reg["height"]:
                raise DataError(
                    f"{self.regions_path}: image {rid!r} is {reg['width']:g}x{reg['height']:g}; "
                    "CLOC needs square images (normalised boxes must match what the tower sees)"
                )

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.captions[i]
        if is_skipped(item):
            return item
        reg = self.regions.get(item["id"], {"boxes": [], "phrases": []})
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        keep = sample_regions(len(reg["boxes"]), self.m, gen)
        item["boxes"] = torch.tensor([reg["boxes"][k] for k in keep], dtype=torch.float32).reshape(-1, 4)
        item["phrases"] = [reg["phrases"][k] for k in keep]
        return item


class RegionCaptionCollator(CaptionCollator):
    """CaptionCollator's batch plus the batch's regions flattened: tokens, boxes, owning image index."""

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        batch = super().__call__(items)
        items = [it for it in items if not is_skipped(it)]
        if not items:
            return batch
        phrases = [p for it in items for p in it["phrases"]]
        batch["region_boxes"] = torch.cat([it["boxes"] for it in items]).reshape(-1, 4)
        batch["region_image"] = torch.tensor(
            [j for j, it in enumerate(items) for _ in it["phrases"]], dtype=torch.long
        )
        if phrases:
            batch["region_input_ids"], batch["region_attention_mask"] = self.tokenize(phrases)
        else:
            batch["region_input_ids"] = torch.zeros(0, 1, dtype=torch.long)
            batch["region_attention_mask"] = torch.zeros(0, 1, dtype=torch.long)
        return batch
