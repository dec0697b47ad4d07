"""The tower warm-up: per-patch labels from a scene graph, and the stage trains only the tower."""

from __future__ import annotations

import copy

import torch

from encoders.supervised import PatchSupervision, PatchTargets
from mllm.data.scene_labels import patch_labels

T = PatchTargets(colours=("red", "blue"), shapes=("circle", "triangle"), density=True)


def test_patch_labels_by_hand():
    scene = {
        "width": 32,
        "height": 32,
        "figure": None,
        "shapes": [
            {
                "kind": "triangle",
                "color": "blue",
                "size": "large",
                "orientation": "down",
                "box": [0, 0, 16, 16],
                "x": 8,
                "y": 8,
            },
            {
                "kind": "circle",
                "color": "red",
                "size": "small",
                "orientation": None,
                "box": [8, 8, 12, 12],
                "x": 10,
                "y": 10,
            },
        ],
    }
    lab = patch_labels(scene, (4, 4), T)  # 8-px cells, centres at 4, 12, 20, 28
    colour = lab["colour"].view(4, 4).tolist()
    # cells (0,0),(0,1),(1,0) -> triangle (blue=2); (1,1) centre (12,12) lies outside the circle's
    # half-open box [8,12) -> still the triangle; everything else background.
    assert colour == [[2, 2, 0, 0], [2, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert lab["orientation"].view(4, 4)[0, 0] == 3  # "down"
    # density: each object's unit mass, N(centre, 4 px) integrated over its own cells and renormalised;
    # the circle owns no cell (its box holds no cell centre), so it adds nothing here
    d = lab["density"].view(4, 4)
    assert d.dtype == torch.float32 and abs(float(d.sum()) - 1.0) < 1e-6
    assert d[2:].sum() == 0 and d[:, 2:].sum() == 0
    # the triangle's centre (8, 8) sits on the corner of its four cells: a quarter each
    assert torch.allclose(d[:2, :2], torch.full((2, 2), 0.25), atol=1e-6)
    scene["shapes"][0].update(x=4, y=4)  # at cell (0, 0)'s centre: most mass there, mirrored elsewhere
    m = patch_labels(scene, (4, 4), T)["density"].view(4, 4)
    from math import erf, sqrt

    inner = 0.5 * (1 + erf(4 / (4 * sqrt(2)))) - 0.5 * (1 + erf(-4 / (4 * sqrt(2))))  # mass of [0, 8)
    outer = 0.5 * (1 + erf(12 / (4 * sqrt(2)))) - 0.5 * (1 + erf(4 / (4 * sqrt(2))))  # of [8, 16)
    want = torch.tensor([[inner * inner, inner * outer], [outer * inner, outer * outer]])
    assert torch.allclose(m[:2, :2], want / want.sum(), atol=1e-6) and abs(float(m.sum()) - 1) < 1e-6
    scene["shapes"][0].update(x=8, y=8)
    scene["shapes"][1]["box"] = [8, 8, 16, 16]  # now covers (12,12): the smaller box wins there
    lab = patch_labels(scene, (4, 4), T)
    assert lab["colour"].view(4, 4)[1, 1] == 1 and lab["shape"].view(4, 4)[1, 1] == 1
    assert lab["size"].view(4, 4)[1, 1] == 1 and lab["orientation"].view(4, 4)[1, 1] == 0


def test_patch_supervision_learns_a_batch(tiny_model):
    torch.manual_seed(0)
    sup = PatchSupervision(tiny_model.tower, T)
    pix = torch.randn(4, 3, 32, 32)
    labels = {k: torch.randint(0, n, (4, 16)) for k, n in T.heads().items()}
    count = torch.tensor([1, 2, 3, 4])
    opt = torch.optim.AdamW(sup.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        out = sup(pix, labels, count)
        first = first if first is not None else float(out.loss.detach())
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(out.loss) < 0.5 * first
    assert set(out.stats) == {"colour", "shape", "size", "orientation", "density", "count"}


def test_readout_heads_are_the_projectors_first_rows(tiny_model):
    """With `readout`, the heads train the projector's first Linear in place (and only its head rows)."""
    torch.manual_seed(0)
    first = tiny_model.projector[0]
    rows = sum(T.heads().values())
    before = first.weight.detach().clone()
    sup = PatchSupervision(tiny_model.tower, T, readout=first)
    assert sup.heads is first and {n for n, _ in sup.named_parameters()} >= {"heads.weight", "heads.bias"}
    pix = torch.randn(4, 3, 32, 32)
    labels = {k: torch.randint(0, n, (4, 16)) for k, n in T.heads().items()}
    opt = torch.optim.AdamW(sup.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(30):
        out = sup(pix, labels, torch.tensor([1, 2, 3, 4]))
        losses.append(float(out.loss))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.5 * losses[0]
    after = tiny_model.projector[0].weight.detach()
    assert not torch.equal(after[:rows], before[:rows]) and torch.equal(after[rows:], before[rows:])


def test_readout_too_narrow_is_refused(tiny_model):
    import pytest

    narrow = torch.nn.Linear(tiny_model.tower.hidden_size, 3)
    with pytest.raises(ValueError, match="cannot hold"):
        PatchSupervision(tiny_model.tower, T, readout=narrow)


def test_centre_head_only_when_asked():
    plain = PatchTargets(colours=("red",), shapes=("circle",))
    assert "density" not in plain.heads() and "density" in T.heads()
    scene = {
        "width": 8,
        "height": 8,
        "figure": None,
        "shapes": [
            {
                "kind": "circle",
                "color": "red",
                "size": "small",
                "orientation": None,
                "box": [0, 0, 8, 8],
                "x": 4,
                "y": 4,
            }
        ],
    }
    assert set(patch_labels(scene, (2, 2), plain)) == {"colour", "shape", "size", "orientation"}


def test_scene_augment_redraws_each_row_from_its_graph(tmp_path):
    """data.scene_augment: a GeoWorld row's pixels are drawn again (shaded, anti-aliased), the same drawing
    every time the row is read, with the file's labels; math figures stay files; off, the files as they are."""
    import numpy as np

    from mllm.data.geoworld import write_world
    from mllm.data.geoworld.augment import AugmentConfig
    from mllm.data.scene_labels import SceneLabelDataset

    write_world(
        tmp_path,
        seed=0,
        n=12,
        size=64,
        n_eval=2,
        mmvp_pairs=1,
        pope_questions=2,
        refcoco_n=1,
        mathverse_problems=1,
        mmvp_vlm_pairs=1,
    )

    def pixels(im):
        return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)[None]

    def ds(augment):
        from mllm.data.geoworld.vocab import COLOR_NAMES, SHAPES

        t = PatchTargets(colours=COLOR_NAMES, shapes=SHAPES)
        return SceneLabelDataset(
            tmp_path / "scenes.jsonl",
            tmp_path,
            t,
            (8, 8),
            lambda ims: torch.cat([pixels(i) for i in ims]),
            augment=augment,
        )

    plain, aug = ds(None), ds(AugmentConfig(p=1.0))
    changed = 0
    for i in range(len(plain)):
        a, b = plain[i], aug[i]
        assert (
            all(torch.equal(a["labels"][k], b["labels"][k]) for k in a["labels"]) and a["count"] == b["count"]
        )
        assert torch.equal(b["pixel_values"], aug[i]["pixel_values"])  # one fixed drawing per row
        is_figure = plain.rows[i]["scene"].get("figure") is not None
        same = torch.equal(a["pixel_values"], b["pixel_values"])
        assert same or not is_figure
        changed += not same
    assert changed >= len(plain) // 2


def test_scene_augment_is_refused_outside_the_warmup_and_with_bad_values(tmp_path):
    import pytest
    import yaml
    from helpers import tiny_recipe, write_tiny_world

    from encoders.common import ConfigError
    from mllm.config import load_recipe

    base = tiny_recipe(write_tiny_world(tmp_path / "w"), backend="torch", zero=None)
    for stage, value, match in (
        ("align", {}, "tower_warmup"),
        (None, {"p": 2.0}, "scene_augment"),
        (None, {"bogus": 1}, "bogus"),
    ):
        r = copy.deepcopy(base)
        if stage is None:
            r["stages"].insert(
                0,
                {
                    "name": "warm",
                    "kind": "tower_warmup",
                    "data": {"json": "x", "scene_augment": value},
                    "max_steps": 1,
                },
            )
        else:
            next(s for s in r["stages"] if s["name"] == stage)["data"]["scene_augment"] = value
        p = tmp_path / "r.yaml"
        p.write_text(yaml.safe_dump(r))
        with pytest.raises(ConfigError, match=match):
            load_recipe(p)


def test_density_head_is_trained_towards_each_patchs_share(tiny_model):
    """The density head's loss is DENSITY_WEIGHT x the soft-label cross-entropy of its 2-way softmax
    against each patch's share d (P("object") -> d), with IGNORE patches (math figures) left out."""
    from encoders.supervised import DENSITY_WEIGHT, IGNORE

    torch.manual_seed(0)
    sup = PatchSupervision(tiny_model.tower, T)
    pix = torch.randn(2, 3, 32, 32)
    labels = {k: torch.zeros(2, 16, dtype=torch.long) for k in T.heads()}
    density = torch.zeros(2, 16)
    density[0, :4] = 0.25  # one object over four patches
    density[1] = IGNORE  # a figure
    labels["density"] = density
    out = sup(pix, labels)
    logits = sup.heads["density"](sup.tower(pix).tokens)[0].log_softmax(-1)
    d = density[0]
    want = -(d * logits[:, 1] + (1 - d) * logits[:, 0]).mean()
    assert torch.allclose(out.stats["density"], DENSITY_WEIGHT * want, atol=1e-5)
