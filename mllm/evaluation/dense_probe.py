"""A dense linear probe on frozen patch tokens (`mllm probe dense`): how well a tower's patches carry
per-patch colour and shape, the evidence for TIPS (and DINO) against CLIP.

Per-patch labels come from the scene graphs (`mllm.data.scene_labels.patch_labels`: the attributes of
the smallest object whose box holds the patch centre; 0 = background); the features are the tower's
tokens, standardised; one multinomial logistic regression per label is fitted on a world's training
scenes and tested on its held-out `eval/scenes.jsonl`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.supervised import PatchTargets
from encoders.towers import Tower, TowerConfig, build_tower
from mllm.data.geoworld.vocab import COLOR_NAMES, SHAPES
from mllm.data.images import load_image, resolve_image
from mllm.data.scene_labels import patch_labels


@torch.no_grad()
def patch_features(
    tower: Tower, scenes_jsonl: str | Path, image_root: str | Path, limit: int | None = None, batch: int = 64
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Frozen patch tokens [P, D] of every primitive scene (math figures have no per-patch labels) and
    their labels {"colour", "shape"} [P] (0 = background), from `mllm.data.scene_labels.patch_labels`."""
    targets = PatchTargets(colours=COLOR_NAMES, shapes=SHAPES)
    rows = [json.loads(ln) for ln in Path(scenes_jsonl).read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if r["scene"].get("figure") is None][:limit]
    feats, labels = [], {"colour": [], "shape": []}
    tower.eval()
    for s in range(0, len(rows), batch):
        chunk = rows[s : s + batch]
        images = [load_image(resolve_image(Path(image_root), r["image"])) for r in chunk]
        out = tower(tower.preprocess(images))
        feats.append(out.tokens.float().reshape(-1, out.tokens.shape[-1]).cpu())
        for r in chunk:
            lab = patch_labels(r["scene"], out.grid, targets)
            for k in labels:
                labels[k].append(lab[k])
    return torch.cat(feats), {k: torch.cat(v) for k, v in labels.items()}


def fit_linear_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    classes: int,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> nn.Linear:
    """Multinomial logistic regression on standardised features (full batch, Adam); features frozen."""
    torch.manual_seed(seed)
    probe = nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(probe(x), y).backward()
        opt.step()
    return probe


def dense_probe(
    tower: Tower, world: str | Path, train_limit: int = 1000, steps: int = 300
) -> dict[str, float]:
    """Per-patch colour and shape accuracy of a linear probe trained on `world`'s training scenes and
    tested on its held-out `eval/scenes.jsonl` (all patches, and foreground patches only)."""
    world = Path(world)
    heads = PatchTargets(colours=COLOR_NAMES, shapes=SHAPES).heads()
    xtr, ytr = patch_features(tower, world / "scenes.jsonl", world, train_limit)
    xte, yte = patch_features(tower, world / "eval" / "scenes.jsonl", world)
    mean, std = xtr.mean(0), xtr.std(0).clamp(min=1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    out: dict[str, float] = {"train_patches": len(xtr), "test_patches": len(xte)}
    for name in ("colour", "shape"):
        probe = fit_linear_probe(xtr, ytr[name], heads[name], steps)
        with torch.no_grad():
            pred = probe(xte).argmax(1)
        fg = yte[name] != 0
        out[f"{name}_acc"] = float((pred == yte[name]).float().mean())
        out[f"{name}_fg_acc"] = float((pred[fg] == yte[name][fg]).float().mean())
    out["foreground_share"] = float((yte["shape"] != 0).float().mean())
    return out


def run_dense_probe(
    type: str,
    tower: str | None = None,
    random: str | None = None,
    world: str | Path = ".",
    train_limit: int = 1000,
    steps: int = 300,
    seed: int = 0,
) -> dict[str, Any]:
    """The probe of a saved tower folder (`tower`), or of an untrained one built from the JSON config
    `random` (a baseline); the result names the tower and its type."""
    torch.manual_seed(seed)
    cfg = (
        TowerConfig(type=type, config=json.loads(random), select_layer=-1)
        if random
        else TowerConfig(type=type, path=tower, select_layer=-1)
    )
    result: dict[str, Any] = dense_probe(build_tower(cfg), world, train_limit, steps)
    result.update(tower=tower or f"random {type}", type=type)
    return result
