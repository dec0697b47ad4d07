"""What the tower objectives besides DINO need from the data (`encoders.ssl.tower_objectives`): SupCon's
class labels, read from each row's GeoWorld scene graph (`scenes.jsonl`), and PixPro's crop boxes (its two
global views cut by `encoders.ssl.pixpro.pixpro_views`, which keeps where each came from), and MLCD's
positive clusters (its offline clustering, run here when the stage builds its data: `mlcd_cluster_labels`).

`with_objective_fields(ds, cfg)` wraps an `ImageViewsDataset` so every item also carries the fields the
objective names in `needs`; for an objective that needs nothing the dataset is returned as it is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from encoders.common import ConfigError
from encoders.objectives_cluster import spherical_kmeans, top_k_clusters
from encoders.ssl.augment import image_to_tensor
from encoders.ssl.model import SSLModel
from encoders.ssl.pixpro import pixpro_views
from encoders.ssl.tower_objectives import TOWER_OBJECTIVES, objective_options
from mllm.data.batch import Skip, is_skipped, skipped
from mllm.data.geoworld.vocab import COLOR_NAMES, SHAPES
from mllm.data.views import ImageViewsDataset

#: The class of an image without primitive shapes (a math figure): a class of its own in SupCon.
NO_LABEL = -1


def scene_label(scene: dict[str, Any], label: str) -> int:
    """The class of a scene: its largest object's shape, colour, or (shape, colour) pair, as an index into
    GeoWorld's vocabularies (`shape_colour`: shape * len(COLOR_NAMES) + colour). Largest = the biggest
    box area, ties broken by the scene's own order. NO_LABEL for a scene without shapes."""
    shapes = scene.get("shapes") or []
    if not shapes:
        return NO_LABEL
    areas = [(s["box"][2] - s["box"][0]) * (s["box"][3] - s["box"][1]) for s in shapes]
    big = shapes[max(range(len(shapes)), key=lambda i: (areas[i], -i))]
    shape, colour = SHAPES.index(big["kind"]), COLOR_NAMES.index(big["color"])
    if label == "shape":
        return shape
    if label == "colour":
        return colour
    if label == "shape_colour":
        return shape * len(COLOR_NAMES) + colour
    raise ValueError(f"unknown scene label {label!r}")


class ObjectiveFieldsDataset(Dataset):
    """An ImageViewsDataset whose items also carry `class_labels` (0-dim long) from the row's scene."""

    def __init__(self, views: ImageViewsDataset, label: str):
        self.views, self.label = views, label
        for i, row in enumerate(views.rows):
            if not isinstance(row.get("scene"), dict):
                raise ValueError(
                    f"{views.path} line {i + 1} (id {row.get('id')!r}): no 'scene' graph; the objective "
                    "needs scene-graph labels: set data.json to a GeoWorld scenes.jsonl"
                )
        self.labels = [scene_label(row["scene"], label) for row in views.rows]

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.views[i]
        if is_skipped(item):
            return item
        return {**item, "class_labels": torch.tensor(self.labels[i], dtype=torch.long)}


class BoxedViewsDataset(Dataset):
    """An ImageViewsDataset whose two global views are cut with their boxes kept (`view_boxes` [2, 4]:
    each view's left, top, right, bottom edges in the original image's [0, 1] coordinates); the local
    crops and masks are the dataset's own."""

    def __init__(self, views: ImageViewsDataset):
        self.views = views
        aug = views.augment
        self.cfg, self.size, self.mean, self.std = aug.cfg, aug.size, aug.mean, aug.std

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ident, image = self.views.load(i)
        if isinstance(image, Skip):
            return skipped(image)
        pixels = image_to_tensor(image)
        c = self.cfg
        boxed = pixpro_views(
            pixels,
            self.size,
            c.global_scale,
            c.ratio,
            c.flip_prob,
            c.jitter_prob,
            c.jitter,
            self.mean,
            self.std,
        )
        return {"id": ident, **self.views.views(pixels), **boxed}


@torch.no_grad()
def mlcd_cluster_labels(
    ds: ImageViewsDataset, model: SSLModel, n_clusters: int, n_positive: int, iters: int, batch: int = 64
) -> torch.Tensor:
    """MLCD's offline step: the model's CLS features of every image of `ds` (unaugmented, the tower's own
    preprocessing), spherical k-means into n_clusters, each image's n_positive nearest centres [N, k]
    (an unreadable image skipped under skip_bad_samples gets the row of zeros; its item is skipped too)."""
    feats, rows = [], []
    for start in range(0, len(ds), batch):
        images = []
        for i in range(start, min(start + batch, len(ds))):
            _, image = ds.load(i)
            if not isinstance(image, Skip):
                images.append(image)
                rows.append(i)
        if images:
            pixels = model.image_tower.preprocess(images).to(model.image_tower.device)
            feats.append(model.encode_cls(pixels).float().cpu())
    x = torch.cat(feats)
    if n_clusters > len(x):
        raise ConfigError(
            f"model.encoder.objective_args.n_clusters={n_clusters} is more than the {len(x)} images of "
            f"{ds.path} (each cluster needs an image)"
        )
    centres, _ = spherical_kmeans(x, n_clusters, iters)
    labels = torch.zeros(len(ds), n_positive, dtype=torch.long)
    labels[torch.tensor(rows)] = top_k_clusters(x, centres, n_positive)
    return labels


class ClusterLabelledViewsDataset(Dataset):
    """An ImageViewsDataset whose items also carry `cluster_labels` [k] (MLCD's positives)."""

    def __init__(self, views: ImageViewsDataset, labels: torch.Tensor):
        self.views, self.labels = views, labels

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.views[i]
        if is_skipped(item):
            return item
        return {**item, "cluster_labels": self.labels[i]}


def with_objective_fields(ds: ImageViewsDataset, model: SSLModel) -> Dataset:
    """`ds` with the fields the model's objective needs (SupCon: class_labels; PixPro: view_boxes; MLCD:
    cluster_labels, clustered here from the model as it starts the stage), or `ds` itself."""
    cfg = model.cfg
    entry = TOWER_OBJECTIVES[cfg.objective]
    needs = getattr(entry.module, "needs", ()) if entry.module is not None else ()
    opts = objective_options(cfg.objective, cfg.objective_args)
    if "class_labels" in needs:
        return ObjectiveFieldsDataset(ds, opts.label)
    if "view_boxes" in needs:
        return BoxedViewsDataset(ds)
    if "cluster_labels" in needs:
        labels = mlcd_cluster_labels(ds, model, opts.n_clusters, opts.n_positive, opts.kmeans_iters)
        return ClusterLabelledViewsDataset(ds, labels)
    return ds
