"""The projection-head probe: the dense per-patch linear probe of `mllm.evaluation.dense_probe` on a trained
contrastive pair's features before its projection head and after it (encoders.projection_head), one row each.

Same labels (GeoWorld scene graphs: colour and shape of the object under each patch, 0 = background), same
standardisation, same logistic regression fitted on the world's training scenes and scored on its held-out
`eval/scenes.jsonl`, so the two rows differ only in which side of `image_proj` the features come from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from encoders.contrastive import ContrastiveModel
from encoders.projection_head import SPACES, image_features
from encoders.supervised import PatchTargets
from mllm.data.geoworld.vocab import COLOR_NAMES, SHAPES
from mllm.data.images import load_image, resolve_image
from mllm.data.scene_labels import patch_labels
from mllm.evaluation.dense_probe import fit_linear_probe

__all__ = ["projection_features", "projection_probe"]


@torch.no_grad()
def projection_features(
    model: ContrastiveModel,
    scenes_jsonl: str | Path,
    image_root: str | Path,
    limit: int | None = None,
    batch: int = 64,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-patch features of every primitive scene in each space ({"pre": [P, D], "post": [P, E]}) and their
    labels {"colour", "shape"} [P], from one tower pass per batch per space."""
    targets = PatchTargets(colours=COLOR_NAMES, shapes=SHAPES)
    rows = [json.loads(ln) for ln in Path(scenes_jsonl).read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if r["scene"].get("figure") is None][:limit]
    feats: dict[str, list[torch.Tensor]] = {s: [] for s in SPACES}
    labels: dict[str, list[torch.Tensor]] = {"colour": [], "shape": []}
    model.eval()
    tower = model.image_tower
    for s in range(0, len(rows), batch):
        chunk = rows[s : s + batch]
        pv = tower.preprocess([load_image(resolve_image(Path(image_root), r["image"])) for r in chunk])
        grid = (pv.shape[-2] // tower.patch_size, pv.shape[-1] // tower.patch_size)
        for space in SPACES:
            x = image_features(model, pv, space, tokens=True).float()
            if x.shape[1] != grid[0] * grid[1]:  # a CLS token kept, or another stage's map than the head's
                raise ValueError(
                    f"{space}-projection features have {x.shape[1]} tokens for a {grid[0]}x{grid[1]} grid; "
                    "the probe needs one token per patch on both sides (select_layer -1, patch tokens only)"
                )
            feats[space].append(x.reshape(-1, x.shape[-1]).cpu())
        for r in chunk:
            lab = patch_labels(r["scene"], grid, targets)
            for k in labels:
                labels[k].append(lab[k])
    return {k: torch.cat(v) for k, v in feats.items()}, {k: torch.cat(v) for k, v in labels.items()}


def projection_probe(
    model: ContrastiveModel, world: str | Path, train_limit: int = 1000, steps: int = 300, seed: int = 0
) -> list[dict[str, Any]]:
    """One row per space ("pre", "post"): per-patch colour and shape accuracy (all patches, foreground
    patches) of a linear probe, and the feature width."""
    world = Path(world)
    heads = PatchTargets(colours=COLOR_NAMES, shapes=SHAPES).heads()
    xtr, ytr = projection_features(model, world / "scenes.jsonl", world, train_limit)
    xte, yte = projection_features(model, world / "eval" / "scenes.jsonl", world)
    rows = []
    for space in SPACES:
        mean, std = xtr[space].mean(0), xtr[space].std(0).clamp(min=1e-6)
        tr, te = (xtr[space] - mean) / std, (xte[space] - mean) / std
        row: dict[str, Any] = {"space": space, "dim": tr.shape[1], "test_patches": len(te)}
        for name in ("colour", "shape"):
            probe = fit_linear_probe(tr, ytr[name], heads[name], steps, seed=seed)
            with torch.no_grad():
                pred = probe(te).argmax(1)
            fg = yte[name] != 0
            row[f"{name}_acc"] = float((pred == yte[name]).float().mean())
            row[f"{name}_fg_acc"] = float((pred[fg] == yte[name][fg]).float().mean())
        rows.append(row)
    return rows
