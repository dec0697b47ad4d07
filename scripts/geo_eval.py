"""Detection quality of a trained geometric encoder on held-out GeoWorld figures.

Usage: python scripts/geo_eval.py GEO_OR_MODEL_DIR WORLD_DIR [SCENES.jsonl:IMAGE_ROOT ...] (relative to WORLD_DIR)
(default: the held-out MMVP scenes and MathVerse figures, which no training scene repeats).
Prints box mAP@0.5 (VOC all-point, mean over classes with ground truth), junction recall/precision
within 2 px (one stride-2 cell), and boundary-pixel F1, as one JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from encoders.geo import GeoEncoder, box_ap, decode_boxes, decode_points, point_recall
from mllm.data.geoworld.geo_targets import GeoFigureDataset, collate_geo

# scenes file -> the folder its image paths are relative to
DEFAULT_SETS = ("mmvp/scenes.jsonl:mmvp", "mathverse/scenes.jsonl:mathverse/images")


def load_geo(path: str | Path) -> GeoEncoder:
    """A geo folder, or a MultimodalLM folder / run folder holding one under `geo/`."""
    path = Path(path)
    if (path / "geo_config.json").is_file():
        return GeoEncoder.from_pretrained(path)
    if (path / "geo" / "geo_config.json").is_file():
        return GeoEncoder.from_pretrained(path / "geo")
    from mllm.training.runner import resolve_model_dir

    return GeoEncoder.from_pretrained(resolve_model_dir(path) / "geo")


@torch.no_grad()
def evaluate(
    geo: GeoEncoder, jsonl: str | Path, root: str | Path, batch: int = 32, tolerance: float = 2.0
) -> dict[str, float]:
    geo.eval()
    ds = GeoFigureDataset(jsonl, root, geo.config.image_size, geo.preprocess, geo.config.classes)
    preds, gts, jpred, jgt = [], [], [], []
    tp = fp = fn = 0.0
    for start in range(0, len(ds), batch):
        idx = list(range(start, min(len(ds), start + batch)))
        b = collate_geo([ds[i] for i in idx])
        out = geo(b["pixel_values"])
        edge_pred = torch.sigmoid(out.boundary) > 0.5
        edge_true = b["boundary"] > 0.5
        tp += float((edge_pred & edge_true).sum())
        fp += float((edge_pred & ~edge_true).sum())
        fn += float((~edge_pred & edge_true).sum())
        for k, i in enumerate(idx):
            t = ds.targets(i)
            preds.append(decode_boxes(out, k))
            gts.append((t.boxes, t.classes))
            jpred.append(decode_points(out, k))
            s = geo.config.image_size
            jgt.append([(x, y) for x, y in t.junctions if 0 <= x < s and 0 <= y < s])
    ap = box_ap(preds, gts, len(geo.config.classes))
    jr = point_recall(jpred, jgt, tolerance)
    f1 = 2 * tp / max(2 * tp + fp + fn, 1.0)
    return {
        "images": float(len(ds)),
        "box_mAP50": ap["mAP"],
        "junction_recall": jr["recall"],
        "junction_precision": jr["precision"],
        "boundary_f1": f1,
    }


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    geo = load_geo(argv[0])
    world = Path(argv[1])
    for spec in argv[2:] or DEFAULT_SETS:
        rel, _, root = spec.partition(":")
        scores = evaluate(geo, world / rel, world / (root or "."))
        print(json.dumps({"set": rel, **{k: round(v, 4) for k, v in scores.items()}}))


if __name__ == "__main__":
    main(sys.argv[1:])
