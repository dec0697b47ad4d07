"""Encoder-level evaluations that return per-item units (mllm.evidence.units), for the claims that
compare pretrained encoders without an LLM: retrieval and MMVP-VLM (the registered benchmarks), ARO-style
caption swaps, a dense per-patch probe, and region retrieval.

Each evaluator takes a trained model folder, the tower type its recipe built, and the world, and returns
(metrics, rows): the metrics for the record, the rows for the paired bootstrap.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from encoders.supervised import PatchTargets
from encoders.towers import TowerConfig, build_tower
from mllm.data.geoworld.language import long_caption
from mllm.data.geoworld.negatives import hard_negatives
from mllm.data.geoworld.sampling import stream
from mllm.data.geoworld.scene import scene_from_dict
from mllm.data.geoworld.vocab import COLOR_NAMES, SHAPES
from mllm.data.images import load_image, resolve_image
from mllm.evaluation.benchmarks import get_benchmark
from mllm.evaluation.dense_probe import fit_linear_probe, patch_features
from mllm.evaluation.regions import heldout_regions, load_region_model, region_hits
from mllm.loading import get_loader

Rows = list[dict[str, Any]]
Evaluator = Callable[[Path, str, Path], tuple[dict[str, Any], Rows]]

SWAP_KINDS = ("attribute", "relation", "order")


def _benchmark(name: str, data: Callable[[Path], Path]) -> Evaluator:
    def run(model_dir: Path, tower_type: str, world: Path) -> tuple[dict[str, Any], Rows]:
        b = get_benchmark(name)
        model = get_loader(b.model_kind).load(model_dir).eval()
        items = b.load(data(world))
        metrics, records = b.score(items, b.respond(model, items, batch_size=64))
        return metrics, records

    return run


@torch.no_grad()
def swaps(model_dir: Path, tower_type: str, world: Path) -> tuple[dict[str, Any], Rows]:
    """ARO-style hard negatives on the held-out scenes: GeoWorld's negative writer (an attribute swapped,
    two objects' places swapped, the attribute order shuffled) applied to each held-out scene, from an
    RNG stream of its own; does the image score its true long caption above each negative? (Training
    captions carry such negatives and NegCLIP trains on them; the held-out scenes never appear in
    training.) Also the embedding space's geometry on the held-out captions: the modality gap (distance
    between the image and text centroids) and Wang & Isola's alignment and uniformity, of the global
    embeddings (which FILIP does not train: its geometry says little)."""
    model = get_loader("contrastive").load(model_dir).eval()
    rows = [json.loads(ln) for ln in (world / "eval" / "scenes.jsonl").read_text().splitlines() if ln.strip()]
    scenes = [scene_from_dict(r["scene"]) for r in rows]
    negs = [hard_negatives(sc, stream(0, "evidence-swaps", k)) for k, sc in enumerate(scenes)]
    images = [load_image(resolve_image(world, r["image"])) for r in rows]
    units: Rows = []
    for kind in SWAP_KINDS:
        keep = [k for k, n in enumerate(negs) if n.get(kind)]
        if not keep:
            continue
        sel = [images[k] for k in keep]  # scored as the objective scores a pair (FILIP: token-wise)
        pos = model.match_scores(sel, [long_caption(scenes[k]) for k in keep])[0].diagonal()
        neg = model.match_scores(sel, [negs[k][kind] for k in keep])[0].diagonal()
        ok = (pos > neg).tolist()
        units += [
            {"id": f"{rows[k]['id']}/{kind}", "group": kind, "correct": int(o)} for k, o in zip(keep, ok)
        ]
    held = [
        json.loads(ln) for ln in (world / "eval" / "captions.jsonl").read_text().splitlines() if ln.strip()
    ]
    hi = model.embed_images([load_image(resolve_image(world, r["image"])) for r in held])
    ht = model.embed_texts([r["long"] for r in held])
    metrics = {
        f"{kind}_accuracy": 100.0
        * sum(u["correct"] for u in units if u["group"] == kind)
        / max(1, sum(u["group"] == kind for u in units))
        for kind in SWAP_KINDS
    }
    metrics.update(
        modality_gap=float((hi.mean(0) - ht.mean(0)).norm()),
        alignment=float((hi - ht).pow(2).sum(1).mean()),
        uniformity_image=float(torch.pdist(hi).pow(2).mul(-2).exp().mean().log()),
        uniformity_text=float(torch.pdist(ht).pow(2).mul(-2).exp().mean().log()),
    )
    return metrics, units


@torch.no_grad()
def dense_probe(model_dir: Path, tower_type: str, world: Path) -> tuple[dict[str, Any], Rows]:
    """`mllm probe dense` per patch: a linear probe per label fitted on 1,000 training scenes' frozen patch
    tokens, one unit per foreground patch of the held-out scenes (group: colour or shape)."""
    torch.manual_seed(0)
    tower = build_tower(TowerConfig(type=tower_type, path=str(model_dir / "image_tower"), select_layer=-1))
    heads = PatchTargets(colours=COLOR_NAMES, shapes=SHAPES).heads()
    xtr, ytr = patch_features(tower, world / "scenes.jsonl", world, 1000)
    xte, yte = patch_features(tower, world / "eval" / "scenes.jsonl", world)
    mean, std = xtr.mean(0), xtr.std(0).clamp(min=1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    units: Rows = []
    metrics: dict[str, Any] = {}
    fg = (yte["shape"] != 0).nonzero().flatten().tolist()
    for name in ("colour", "shape"):
        with torch.enable_grad():
            probe = fit_linear_probe(xtr, ytr[name], heads[name], 300)
        right = (probe(xte).argmax(1) == yte[name]).tolist()
        units += [{"id": f"p{k}/{name}", "group": name, "correct": int(right[k])} for k in fg]
        metrics[f"{name}_fg_acc"] = 100.0 * sum(right[k] for k in fg) / max(1, len(fg))
    metrics["foreground_patches"] = len(fg)
    return metrics, units


@torch.no_grad()
def regions(model_dir: Path, tower_type: str, world: Path) -> tuple[dict[str, Any], Rows]:
    """Region -> phrase R@1 on the held-out scenes, one unit per region (CLIP embeds crops; CLOC its
    prompted region embeddings), and CLOC's grounding Acc@0.5 where it has the head."""
    model = load_region_model(model_dir)
    rows = heldout_regions(world / "eval" / "scenes.jsonl")
    hits, iou = region_hits(model, rows)
    ids = [f"{Path(r['image']).name}#{k}" for r in rows for k in range(len(r["regions"]))]
    units = [{"id": i, "group": "region_r1", "correct": int(h)} for i, h in zip(ids, hits.tolist())]
    metrics: dict[str, Any] = {"region_r1": 100.0 * float(hits.float().mean()), "regions": len(units)}
    if iou is not None:
        units += [
            {"id": f"{i}/ground", "group": "ground_acc50", "correct": int(v >= 0.5)}
            for i, v in zip(ids, iou.tolist())
        ]
        metrics["ground_acc50"] = 100.0 * float((iou >= 0.5).float().mean())
    return metrics, units


ENCODER_EVALS: dict[str, Evaluator] = {
    "retrieval": _benchmark("retrieval", lambda w: w),
    "mmvp_vlm": _benchmark("mmvp_vlm", lambda w: w / "mmvp_vlm"),
    "swaps": swaps,
    "dense_probe": dense_probe,
    "regions": regions,
}
