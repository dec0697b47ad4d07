"""Images as self-distillation sees them: augmented views and iBOT masks (model kinds `ssl` and `tips`).

`ImageViewsDataset` reads any JSONL with an `image` field (GeoWorld scenes, captions, regions) and
returns DINO's views of each image (`encoders.ssl.Augmenter`) with their masks; `TipsDataset` adds the
clean pixels and both GeoWorld captions (`encoders.tips.TipsModel.forward`'s inputs), and the collators
stack them, passing skipped samples on for the engine to list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from encoders.ssl.augment import Augmenter, augmenter_for, image_to_tensor, sample_masks
from encoders.ssl.config import DistillConfig
from encoders.tips import TipsConfig
from encoders.towers import Tower
from mllm.data.batch import Batch, Skip, is_skipped, skipped, start_batch
from mllm.data.geoworld.files import read_jsonl
from mllm.data.images import ImageError, load_image, resolve_image


class ImageViewsDataset(Dataset):
    """Any JSONL with an `image` field per line (GeoWorld scenes/captions/regions) -> augmented views.

    Randomness comes from the global torch RNG in the loading process, which the engine seeds and
    restores on resume; with `num_workers > 0` each worker is seeded by torch's DataLoader.
    """

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None,
        augment: Augmenter,
        grid: tuple[int, int],
        distill: DistillConfig,
        skip_bad_samples: bool = False,
    ):
        self.path = Path(path)
        self.root = Path(image_root) if image_root is not None else self.path.parent
        self.rows = read_jsonl(self.path)
        for i, row in enumerate(self.rows):
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                raise ValueError(f"{self.path} line {i + 1}: expected an object with a string 'image' field")
        self.augment, self.grid, self.distill, self.skip = augment, grid, distill, skip_bad_samples

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, i: int) -> tuple[str, Any]:
        """(sample id, PIL image) or (sample id, Skip) for an unreadable image under skip_bad_samples."""
        row = self.rows[i]
        name = f"{self.path} line {i + 1} (id {row.get('id')!r})"
        try:
            image = load_image(resolve_image(self.root, row["image"]))
        except ImageError as e:
            if self.skip:
                return str(row.get("id", i)), Skip(name, f"{name}: {e}")
            raise ImageError(f"{name}: {e}") from e
        return str(row.get("id", i)), image

    def views(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.augment(image)
        out["masks"] = sample_masks(2, self.grid, self.distill.mask_prob, self.distill.mask_ratio)
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        ident, image = self.load(i)
        if isinstance(image, Skip):
            return skipped(image)
        return {"id": ident, **self.views(image_to_tensor(image))}


def collate_views(items: list[dict[str, Any]]) -> Batch:
    """Stack every tensor field; skipped samples are passed on for the engine to list."""
    items, batch = start_batch(items)
    if items:
        for key, value in items[0].items():
            if isinstance(value, torch.Tensor):
                batch[key] = torch.stack([it[key] for it in items])
    return batch


class TipsDataset(Dataset):
    """GeoWorld captions.jsonl -> clean pixels + short + long caption + DINO views and iBOT masks."""

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None,
        tower: Tower,
        tips: TipsConfig,
        skip_bad_samples: bool = False,
    ):
        self.views = ImageViewsDataset(
            path, image_root, augmenter_for(tower, tips.augment), tower.grid, tips.distill, skip_bad_samples
        )
        self.preprocess = tower.preprocess
        for i, row in enumerate(self.views.rows):
            for key in ("short", "long"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise ValueError(
                        f"{self.views.path} line {i + 1} (id {row.get('id')!r}): no {key!r} caption; "
                        "TIPS needs both GeoWorld captions"
                    )

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ident, image = self.views.load(i)
        if isinstance(image, Skip):
            return skipped(image)
        row = self.views.rows[i]
        return {
            "id": ident,
            "pixel_values": self.preprocess([image])[0],
            "short": row["short"],
            "long": row["long"],
            **self.views.views(image_to_tensor(image)),
        }


class TipsCollator:
    def __init__(self, tokenize: Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]):
        self.tokenize = tokenize

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        batch = collate_views([{k: v for k, v in it.items() if k not in ("short", "long")} for it in items])
        kept = [it for it in items if not is_skipped(it)]
        if kept:
            batch["input_ids"], batch["attention_mask"] = self.tokenize([it["short"] for it in kept])
            batch["long_input_ids"], batch["long_attention_mask"] = self.tokenize([it["long"] for it in kept])
        return batch
