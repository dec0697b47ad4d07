"""Region retrieval and grounding on held-out GeoWorld (`mllm probe regions`): CLOC against CLIP's crops.

Regions are every primitive of a GeoWorld scenes file with the writer's unique phrases
(`heldout_regions`). Region R@1: each region's embedding, against every distinct phrase of the set, is
closest to its own phrase. A CLOC model embeds a region with its Prompter and grounds a phrase with its
head (Acc@0.5, mIoU); a plain ContrastiveModel (CLIP) embeds the box cropped out of the image and has no
grounding head, so `mean_box_accuracy` gives grounding's no-image reference (always the mean training box).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from encoders.cloc import ClocModel, box_iou, is_cloc_dir
from encoders.contrastive import ContrastiveModel
from mllm.data.geoworld.language import region_phrase
from mllm.data.geoworld.scene import scene_from_dict
from mllm.data.images import load_image
from mllm.data.regions import read_regions


def heldout_regions(
    scenes_jsonl: str | Path, limit: int | None = None, image_root: str | Path | None = None
) -> list[dict[str, Any]]:
    """Regions of a GeoWorld scenes file (e.g. eval/scenes.jsonl): the writer's boxes and unique phrases.

    Image paths are relative to `image_root`, by default the world folder (held-out scenes files sit one
    level below it and name `eval/images/...`).
    """
    path = Path(scenes_jsonl)
    root = (
        Path(image_root)
        if image_root is not None
        else (path.parent.parent if path.parent.name in ("eval", "mmvp", "pope", "refcoco") else path.parent)
    )
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[:limit]:
        row = json.loads(line)
        scene = scene_from_dict(row["scene"])
        if scene.figure is not None:
            continue
        regs = []
        for i, s in enumerate(scene.shapes):
            phrase = region_phrase(scene, i)
            if phrase:
                x1, y1, x2, y2 = s.box
                regs.append(
                    {
                        "box": [x1 / scene.width, y1 / scene.height, x2 / scene.width, y2 / scene.height],
                        "phrase": phrase,
                    }
                )
        if regs:
            rows.append({"image": str(root / row["image"]), "regions": regs})
    return rows


@torch.no_grad()
def crop_region_embeddings(
    model: ContrastiveModel, images: Sequence[Image.Image], boxes: torch.Tensor, image_index: torch.Tensor
) -> torch.Tensor:
    """The CLIP baseline's region embedding: crop the box out of the image and embed the crop."""
    crops = []
    for b, k in zip(boxes.tolist(), image_index.tolist(), strict=True):
        im = images[k]
        w, h = im.size
        crops.append(im.crop((b[0] * w, b[1] * h, b[2] * w, b[3] * h)))
    return model.embed_images(crops)


@torch.no_grad()
def evaluate_regions(
    model: ContrastiveModel, rows: list[dict[str, Any]], batch: int = 64
) -> dict[str, float]:
    """Region retrieval (region -> phrase R@1 over every distinct phrase of the set; a hit is the same
    phrase text) and, for a CLOC model, grounding Acc@0.5 (IoU of the predicted box with the true one).

    A plain ContrastiveModel (CLIP) gets region embeddings from crops; it has no grounding head.
    """
    hits, iou = region_hits(model, rows, batch)
    out = {"regions": len(hits), "phrases": len({reg["phrase"] for r in rows for reg in r["regions"]})}
    out["region_r1"] = float(hits.float().mean())
    if iou is not None:
        out["ground_acc50"] = float((iou >= 0.5).float().mean())
        out["ground_miou"] = float(iou.mean())
    return out


@torch.no_grad()
def region_hits(
    model: ContrastiveModel, rows: list[dict[str, Any]], batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per region, in the order of `rows`: whether its nearest phrase is its own ([R] bool), and for a
    CLOC model the IoU of the box it grounds its phrase to ([R]; None for CLIP). Per-region values are
    what a paired comparison of two models resamples (`mllm evidence cloc`)."""
    images = [load_image(r["image"]) for r in rows]
    boxes = torch.tensor([reg["box"] for r in rows for reg in r["regions"]], dtype=torch.float32)
    phrases = [reg["phrase"] for r in rows for reg in r["regions"]]
    owner = torch.tensor([i for i, r in enumerate(rows) for _ in r["regions"]])
    vocab = sorted(set(phrases))
    text = model.embed_texts(vocab)
    want = torch.tensor([vocab.index(p) for p in phrases])
    emb, pred = [], []
    for s in range(0, len(rows), batch):
        sel = (owner >= s) & (owner < s + batch)
        idx = owner[sel] - s
        if isinstance(model, ClocModel):
            pix = model.image_tower.preprocess(images[s : s + batch])
            emb.append(model.region_embeddings(pix, boxes[sel], idx))
            pred.append(
                model.ground_boxes(pix, [p for p, m in zip(phrases, sel.tolist(), strict=True) if m], idx)
            )
        else:
            emb.append(crop_region_embeddings(model, images[s : s + batch], boxes[sel], idx))
    region = torch.cat(emb)
    top1 = (region @ text.to(region.device).t()).argmax(1).cpu()
    iou = box_iou(torch.cat(pred).cpu(), boxes) if pred else None
    return top1 == want, iou


def mean_box_accuracy(rows: list[dict[str, Any]], train_regions: str | Path) -> dict[str, float]:
    """The no-image reference for grounding: always answer the mean training box (Acc@0.5, mIoU)."""
    boxes = [b for r in read_regions(Path(train_regions)).values() for b in r["boxes"]]
    mean = torch.tensor(boxes, dtype=torch.float32).mean(0, keepdim=True)
    truth = torch.tensor([reg["box"] for r in rows for reg in r["regions"]], dtype=torch.float32)
    iou = box_iou(mean.expand_as(truth), truth)
    return {"mean_box_acc50": float((iou >= 0.5).float().mean()), "mean_box_miou": float(iou.mean())}


def load_region_model(path: str | Path) -> ContrastiveModel:
    """A CLOC folder as a ClocModel, any other contrastive folder as a plain ContrastiveModel."""
    return ClocModel.from_pretrained(path) if is_cloc_dir(path) else ContrastiveModel.from_pretrained(path)


def run_regions(
    model_dir: str | Path,
    scenes: str | Path,
    images: str | Path | None = None,
    limit: int | None = None,
    train_regions: str | Path | None = None,
) -> dict[str, Any]:
    """The whole evaluation of one saved model: region R@1, grounding (CLOC) and, given the training
    regions, the mean-box reference; the model folder is recorded in the result."""
    model = load_region_model(model_dir)
    rows = heldout_regions(scenes, limit, images)
    result: dict[str, Any] = evaluate_regions(model, rows)
    if train_regions:
        result.update(mean_box_accuracy(rows, train_regions))
    result["model"] = str(model_dir)
    return result
