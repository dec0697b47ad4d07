"""The GeoGLIP-style geometric encoder (encoders.geo) and its GeoWorld targets (geo_targets): targets
follow the pixels, perfect predictions decode to perfect scores, the losses train, the `geoglip` stage
trains only `geo`, and save/load round-trips."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from encoders.geo import (
    GEO_CLASSES,
    GeoConfig,
    GeoDetector,
    GeoEncoder,
    GeoOutput,
    box_ap,
    decode_boxes,
    decode_points,
    point_recall,
)
from mllm.data.geoworld.geo_targets import GeoFigureDataset, collate_geo, dense_targets, figure_targets
from mllm.data.geoworld.scene import Scene, make_shape

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
TINY = GeoConfig(image_size=64, channels=[8, 16, 16, 24], fpn_dim=16, attn_heads=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mllm.data.geoworld import write_world

    out = tmp_path_factory.mktemp("geoworld")
    write_world(
        out,
        seed=1,
        n=40,
        size=64,
        n_eval=16,
        mmvp_pairs=8,
        pope_questions=6,
        refcoco_n=4,
        mathverse_problems=2,
        mmvp_vlm_pairs=1,
        math_frac=0.3,
    )
    return out


def test_targets_of_shapes_and_figures():
    square = make_shape("square", "red", "large", 32, 32, 0, 64, 64)
    circle = make_shape("circle", "blue", "small", 12, 12, 0, 64, 64)
    t = figure_targets(Scene(64, 64, [square, circle]))
    assert t.classes == [GEO_CLASSES.index("square"), GEO_CLASSES.index("circle")]
    assert t.boxes[0] == [float(v) for v in square.box]
    assert len(t.junctions) == 4 and len(t.segments) == 4 and len(t.circles) == 1  # circles: no vertices
    for x, y in t.junctions:  # each vertex lies on (or one pixel off) the drawn box
        x1, y1, x2, y2 = square.box
        assert x1 - 1 <= x <= x2 and y1 - 1 <= y <= y2
    half = t.transformed(0.5, 0.0, 0.0)
    assert half.boxes[0] == [v / 2 for v in t.boxes[0]] and half.circles[0][2] == t.circles[0][2] / 2


def test_dense_targets_mark_centres_vertices_and_edges():
    square = make_shape("square", "red", "large", 30, 34, 0, 64, 64)
    d = dense_targets(figure_targets(Scene(64, 64, [square])), 64, len(GEO_CLASSES))
    c = GEO_CLASSES.index("square")
    assert d["box_heat"].shape == (len(GEO_CLASSES), 16, 16) and int(d["box_mask"].sum()) == 1
    assert float(d["box_heat"][c].max()) == 1.0 and float(d["box_heat"][:c].sum()) == 0.0
    assert int((d["junction"] == 1).sum()) == 4
    assert 20 < int(d["boundary"].sum()) < 200  # a square outline at stride 2, not the filled area


def _perfect(d: dict[str, torch.Tensor]) -> GeoOutput:
    """Logits that reproduce the targets exactly (peaks where the targets are 1)."""
    heat = torch.where(d["box_heat"] == 1, 10.0, -10.0)[None]
    junction = torch.where(d["junction"] == 1, 10.0, -10.0)[None]
    return GeoOutput(
        [], heat, d["box_size"][None], d["box_offset"][None], junction, d["boundary"][None] * 20 - 10
    )


def test_perfect_predictions_decode_to_perfect_scores(world):
    ds = GeoFigureDataset(world / "scenes.jsonl", world, 64, GeoEncoder(TINY).preprocess)
    preds, gts, jp, jg = [], [], [], []
    for i in range(len(ds)):
        t = ds.targets(i)
        d = dense_targets(t, 64, len(GEO_CLASSES))
        out = _perfect(d)
        preds.append(decode_boxes(out, 0))
        gts.append((t.boxes, t.classes))
        jp.append(decode_points(out, 0))
        jg.append(t.junctions)
    assert box_ap(preds, gts, len(GEO_CLASSES))["mAP"] > 0.95
    assert point_recall(jp, jg, tolerance=2.0)["recall"] > 0.9
    # and a detector that finds nothing scores zero
    assert box_ap([[] for _ in gts], gts, len(GEO_CLASSES))["mAP"] == 0.0


def test_losses_are_finite_and_fall_when_fitting_a_batch(world):
    torch.manual_seed(0)
    geo = GeoEncoder(TINY)
    ds = GeoFigureDataset(world / "scenes.jsonl", world, 64, geo.preprocess)
    batch = collate_geo([ds[i] for i in range(8)])
    det = GeoDetector(geo)
    opt = torch.optim.AdamW(det.parameters(), lr=3e-3)
    inputs = {k: v for k, v in batch.items() if k not in ("skips", "ids")}
    losses = []
    for _ in range(25):
        out = det(**inputs)
        assert math.isfinite(float(out.loss.detach())) and set(out.stats) == {
            "box_heat",
            "box_size",
            "box_offset",
            "junction",
            "boundary",
        }
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.6 * losses[0], losses


def test_save_and_load_round_trip(tmp_path):
    geo = GeoEncoder(TINY).eval()
    geo.save_pretrained(tmp_path / "geo")
    back = GeoEncoder.from_pretrained(tmp_path / "geo").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = geo(x), back(x)
    assert torch.equal(a.box_heat, b.box_heat) and torch.equal(a.levels[0], b.levels[0])
    assert back.config == geo.config
    with pytest.raises(FileNotFoundError, match="geo_config.json"):
        GeoEncoder.from_pretrained(tmp_path)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="divisible"):
        GeoEncoder(GeoConfig(fpn_dim=10, attn_heads=4))
    with pytest.raises(ValueError, match="multiple"):
        GeoEncoder(GeoConfig(image_size=72))


def test_geoglip_stage_trains_only_geo_then_eval_script_runs(world, tmp_path):
    from dataclasses import asdict

    from geo_eval import evaluate
    from helpers import tiny_recipe

    from mllm.config import recipe_from_dict
    from mllm.model import MultimodalLM
    from mllm.training.runner import build_model, run_stage

    r = tiny_recipe(
        {"align": world / "align.json", "instruct": world / "instruct.json", "images": world},
        "torch",
        None,
        steps=(1, 1),
    )
    r["model"]["tower"]["config"].update(image_size=64)
    r["model"]["fusion"] = {"type": "router", "geo": asdict(TINY)}
    r["stages"] = [
        {
            "name": "geoglip",
            "kind": "geoglip",
            "data": {"json": str(world / "scenes.jsonl"), "images": str(world)},
            "lr": 3e-3,
            "batch_size": 8,
            "max_steps": 4,
            "warmup_ratio": 0.0,
        }
    ]
    recipe = recipe_from_dict(r)
    model = build_model(recipe.model, tmp_path, [world / "align.json"], seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_stage(model, recipe, recipe.stage("geoglip"), tmp_path / "geoglip")
    after = MultimodalLM.from_pretrained(tmp_path / "geoglip" / "final").state_dict()
    changed = {k.split(".")[0] for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed == {"geo"}
    geo = GeoEncoder.from_pretrained(tmp_path / "geoglip" / "final" / "geo")
    scores = evaluate(geo, world / "mmvp" / "scenes.jsonl", world / "mmvp")
    assert scores["images"] == 16 and 0.0 <= scores["box_mAP50"] <= 1.0
