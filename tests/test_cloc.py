"""encoders.cloc: box code, Prompter, the negative filter, region InfoNCE against a naive computation,
grounding overfit, the s-weighted total (s = 0 is CLIP), the data join (mllm.data.regions), the region
evaluation (mllm.evaluation.regions, `mllm probe regions`), and the saved tower in an MLLM."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_ssl import assert_tower_loads_into_mllm, check_recipe, recipe_world  # noqa: F401

from encoders.cloc import (
    ClocConfig,
    ClocModel,
    Prompter,
    box_encoding,
    box_iou,
    combined_loss,
    negative_filter,
    region_info_nce,
)
from encoders.contrastive import ContrastiveModel, EncoderConfig
from encoders.text_tower import TextTowerConfig, build_text_tower
from encoders.towers import TowerConfig, build_tower
from mllm.data.conversations import DataError
from mllm.data.regions import RegionCaptionCollator, RegionCaptionDataset, read_regions, sample_regions
from mllm.evaluation.regions import evaluate_regions, heldout_regions, mean_box_accuracy

TINY_VIT = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=64,
)


def _cloc(tokenizer, **cloc) -> ClocModel:
    torch.manual_seed(0)
    cfg = EncoderConfig(objective="clip", embed_dim=16, text=TextTowerConfig(config=TINY_TEXT, max_length=64))
    base = ContrastiveModel(
        build_tower(TowerConfig(type="clip", config=TINY_VIT, select_layer=-1)),
        build_text_tower(cfg.text, tokenizer),
        cfg,
    )
    return ClocModel.from_contrastive(base, ClocConfig(**cloc))


# ------------------------------------------------------------------------------------------- box code


def test_box_encoding_is_sinusoidal_per_coordinate():
    boxes = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.6, 0.9], [0.1, 0.2, 0.6, 0.91]])
    code = box_encoding(boxes, 32)
    assert code.shape == (3, 32)
    # x = 0: every sin is 0 and every cos is 1 (sin/cos interleaved per frequency)
    assert torch.allclose(code[0, 0::2], torch.zeros(16)) and torch.allclose(code[0, 1::2], torch.ones(16))
    # coordinate 1 (y1 = 0.2), frequency 0: sin(2*pi*0.2)
    assert math.isclose(code[1, 8].item(), math.sin(2 * math.pi * 0.2), abs_tol=1e-6)
    # frequency k of a coordinate: 2*pi*x / T^(2k/8), T = 10000
    assert math.isclose(code[1, 2 * 3].item(), math.sin(2 * math.pi * 0.1 / 10000 ** (6 / 8)), abs_tol=1e-6)
    # nearby boxes get nearby codes; the last coordinate is what differs
    diff = (code[1] - code[2]).abs()
    assert diff[:24].max() == 0 and 0 < diff[24:].max() < 0.1
    with pytest.raises(ValueError, match="multiple of 8"):
        box_encoding(boxes, 20)
    with pytest.raises(ValueError, match=r"\[R, 4\]"):
        box_encoding(torch.zeros(3, 5), 32)


def test_prompter_shapes_and_the_prompt_matters():
    torch.manual_seed(0)
    p = Prompter(width=24, embed_dim=10, box_dim=16)
    tokens = torch.randn(3, 17, 24)
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]])
    emb = p.region_embedding(tokens, boxes)
    assert emb.shape == (3, 10) and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    # same image tokens, different boxes -> different region embeddings
    same_img = p.region_embedding(tokens[[0, 0]], boxes[:2])
    assert not torch.allclose(same_img[0], same_img[1], atol=1e-4)
    # one single-head layer of the tower's width
    assert p.layer.self_attn.num_heads == 1 and p.layer.self_attn.embed_dim == 24
    box = p.ground(tokens, torch.randn(3, 10))
    assert box.shape == (3, 4) and (box > 0).all() and (box < 1).all()


# ------------------------------------------------------------------------------------------- losses


def test_negative_filter_drops_exactly_the_pairs_above_threshold():
    # hand-made unit vectors with known cosines: e0.e1 = 0.95, e0.e2 = 0.6, e1.e2 = cos(acos .95 + acos .6)
    a, b = math.acos(0.95), math.acos(0.6)
    t = torch.tensor([[1.0, 0.0], [math.cos(a), math.sin(a)], [math.cos(b), -math.sin(b)], [1.0, 0.0]])
    drop = negative_filter(t * 3.0, 0.9)  # scale must not matter (cosine)
    want = torch.zeros(4, 4, dtype=torch.bool)
    for i, j in ((0, 1), (1, 0), (0, 3), (3, 0), (1, 3), (3, 1)):
        want[i, j] = True
    assert torch.equal(drop, want)
    assert not drop.diagonal().any()


def test_region_info_nce_equals_a_naive_computation():
    torch.manual_seed(0)
    r = F.normalize(torch.randn(5, 8), dim=-1)
    t = F.normalize(torch.randn(5, 8), dim=-1)
    t[3] = F.normalize(t[1] + 0.01 * torch.randn(8), dim=0)  # a near duplicate phrase -> filtered pair (1, 3)
    scale = 7.0
    loss, dropped = region_info_nce(r, t, torch.tensor([scale]), 0.9)
    sim_tt = t @ t.t()
    total = 0.0
    for i in range(5):
        keep = [j for j in range(5) if j == i or sim_tt[i, j] <= 0.9]
        logits_i2t = torch.stack([scale * r[i] @ t[j] for j in keep])
        logits_t2i = torch.stack([scale * t[i] @ r[j] for j in keep])
        pos = keep.index(i)
        total += -(F.log_softmax(logits_i2t, 0)[pos]) / 2 - F.log_softmax(logits_t2i, 0)[pos] / 2
    assert torch.allclose(loss, total / 5, atol=1e-5)
    assert dropped == pytest.approx(2 / 20)


def test_combined_loss_weighting():
    clip, cloc, ground = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(0.5)
    assert combined_loss(clip, cloc, ground, 0.0, 1.0).item() == 2.0
    assert combined_loss(clip, cloc, ground, 0.5, 2.0).item() == pytest.approx(2.0 + 1.0 * 3.5)


def test_grounding_loss_decreases_on_a_tiny_overfit():
    torch.manual_seed(0)
    p = Prompter(width=16, embed_dim=8, box_dim=16)
    tokens = torch.randn(6, 9, 16)
    text = F.normalize(torch.randn(6, 8), dim=-1)
    target = torch.tensor(
        [
            [0.1, 0.1, 0.4, 0.5],
            [0.5, 0.2, 0.9, 0.6],
            [0.0, 0.6, 0.3, 1.0],
            [0.3, 0.3, 0.7, 0.7],
            [0.6, 0.7, 0.8, 0.9],
            [0.2, 0.0, 0.5, 0.2],
        ]
    )
    opt = torch.optim.Adam(p.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = F.mse_loss(p.ground(tokens, text), target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10, (first, loss.item())
    assert box_iou(p.ground(tokens, text).detach(), target).mean() > 0.7


def test_sample_regions_is_seeded_and_bounded():
    a = sample_regions(10, 4, torch.Generator().manual_seed(5))
    assert a == sample_regions(10, 4, torch.Generator().manual_seed(5)) and len(a) == 4 and a == sorted(a)
    assert len(set(a)) == 4 and sample_regions(3, 4) == [0, 1, 2]


# ------------------------------------------------------------------------------------------- the model


def _batch(model: ClocModel, with_regions: list[int]) -> dict:
    torch.manual_seed(1)
    pv = torch.randn(4, 3, 32, 32)
    ids, mask = model.text_tower.tokenize(
        ["a large red circle", "a blue square", "two shapes", "a green triangle"]
    )
    batch = {"pixel_values": pv, "input_ids": ids, "attention_mask": mask}
    phrases = ["the red circle", "the blue square", "the green triangle", "the small square"]
    boxes = torch.tensor(
        [[0.1, 0.1, 0.5, 0.5], [0.2, 0.5, 0.6, 0.9], [0.5, 0.5, 0.9, 0.9], [0.0, 0.0, 0.2, 0.2]]
    )
    owners = [i for i in with_regions for _ in range(2)]
    if owners:
        batch["region_input_ids"], batch["region_attention_mask"] = model.text_tower.tokenize(
            phrases[: len(owners)]
        )
        batch["region_boxes"] = boxes[: len(owners)]
        batch["region_image"] = torch.tensor(owners)
    return batch


def test_without_regions_the_loss_is_plain_clip(tokenizer):
    model = _cloc(tokenizer)
    batch = _batch(model, [])
    clip = ContrastiveModel.forward(model, **batch).loss
    out = model(**batch)
    assert torch.allclose(out.loss, clip) and out.stats["region_share"] == 0.0
    # the one-pass image embedding is exactly encode_image's
    assert torch.allclose(
        model.image_pass(batch["pixel_values"])[0], model.encode_image(batch["pixel_values"])
    )


def test_region_share_scales_the_localisation_losses(tokenizer):
    model = _cloc(tokenizer, weight=2.0)
    batch = _batch(model, [0, 2])  # 2 of 4 images carry regions (2 each)
    out = model(**batch)
    s = out.stats
    assert s["region_share"] == 0.5 and s["regions"] == 4
    assert out.loss.item() == pytest.approx(
        float(s["clip"] + 2.0 * 0.5 * (s["cloc"] + s["ground"])), rel=1e-5
    )
    out.loss.backward()
    assert (
        model.prompter.box_prompt.weight.grad is not None
        and model.prompter.text_prompt.weight.grad is not None
    )
    assert model.prompter.ground_head[0].weight.grad.abs().sum() > 0


def test_cloc_needs_a_global_objective_without_extras(tokenizer):
    cfg = EncoderConfig(
        objective="filip", embed_dim=16, text=TextTowerConfig(config=TINY_TEXT, max_length=64)
    )
    base_tower = build_tower(TowerConfig(type="clip", config=TINY_VIT, select_layer=-1))
    with pytest.raises(ValueError, match="needs"):
        ClocModel(base_tower, build_text_tower(cfg.text, tokenizer), cfg)


# ------------------------------------------------------------------------------------------- data + save


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mllm.data.geoworld import write_world

    out = tmp_path_factory.mktemp("geoworld")
    write_world(
        out,
        seed=2,
        n=12,
        size=48,
        n_eval=8,
        mmvp_pairs=2,
        pope_questions=6,
        refcoco_n=2,
        mathverse_problems=1,
    )
    return out


def test_regions_join_the_captions(tokenizer, world):
    model = _cloc(tokenizer, regions_per_image=2)
    ds = RegionCaptionDataset(
        world / "captions.jsonl",
        world / "regions.jsonl",
        world,
        model.image_tower.preprocess,
        "long",
        regions_per_image=2,
    )
    regions = read_regions(world / "regions.jsonl")
    torch.manual_seed(0)
    items = [ds[i] for i in range(6)]
    for it in items:
        reg = regions[it["id"]]
        assert len(it["phrases"]) == min(2, len(reg["phrases"])) and it["boxes"].shape == (
            len(it["phrases"]),
            4,
        )
        for p, b in zip(it["phrases"], it["boxes"].tolist(), strict=True):
            assert b == pytest.approx(reg["boxes"][reg["phrases"].index(p)])
            assert 0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1
    batch = RegionCaptionCollator(model.text_tower.tokenize)(items)
    n = sum(len(it["phrases"]) for it in items)
    assert batch["region_boxes"].shape == (n, 4) and batch["region_input_ids"].shape[0] == n
    assert batch["region_image"].tolist() == [j for j, it in enumerate(items) for _ in it["phrases"]]
    out = model(**{k: v for k, v in batch.items() if k not in ("skips", "ids")})
    assert torch.isfinite(out.loss) and out.stats["regions"] == n


def test_a_bad_region_row_names_its_line(tmp_path):
    rows = [
        {
            "id": "a",
            "image": "x.png",
            "width": 48,
            "height": 48,
            "regions": [{"box": [0, 0, 10, 10], "phrase": "the red circle"}],
        },
        {
            "id": "b",
            "image": "y.png",
            "width": 48,
            "height": 48,
            "regions": [{"box": [0, 0, 60, 10], "phrase": "the blue square"}],
        },
    ]
    path = tmp_path / "regions.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"regions.jsonl line 2: .*not inside"):
        read_regions(path)


def test_cloc_saves_loads_and_its_tower_goes_into_multimodal_lm(tokenizer, world, tmp_path):
    model = _cloc(tokenizer).eval()
    model.save_pretrained(tmp_path / "cloc")
    back = ClocModel.from_pretrained(tmp_path / "cloc")
    rows = heldout_regions(world / "eval" / "scenes.jsonl", limit=4)
    assert rows and all(r["regions"] for r in rows)
    from mllm.data.images import load_image

    image = load_image(rows[0]["image"])
    box, phrase = rows[0]["regions"][0]["box"], rows[0]["regions"][0]["phrase"]
    assert torch.allclose(model.region_embedding(image, box), back.region_embedding(image, box), atol=1e-6)
    g = back.ground(image, phrase)
    assert g == pytest.approx(model.ground(image, phrase), abs=1e-6) and g[0] <= g[2] and g[1] <= g[3]
    # a CLOC folder is a contrastive folder too (CLIP evaluation of the same towers)
    plain = ContrastiveModel.from_pretrained(tmp_path / "cloc")
    metrics = evaluate_regions(back, rows)
    assert set(metrics) >= {"region_r1", "ground_acc50"} and 0 <= metrics["region_r1"] <= 1
    assert "ground_acc50" not in evaluate_regions(plain, rows)
    # the same evaluation from the command line (`mllm probe regions`), result JSON printed and written
    from mllm.cli import main

    out = tmp_path / "regions.json"
    assert (
        main(
            [
                "probe",
                "regions",
                "--model",
                str(tmp_path / "cloc"),
                "--scenes",
                str(world / "eval" / "scenes.jsonl"),
                "--limit",
                "4",
                "--train-regions",
                str(world / "regions.jsonl"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    cli = json.loads(out.read_text())
    assert cli["model"] == str(tmp_path / "cloc") and {"mean_box_acc50", "ground_acc50"} <= set(cli)
    assert cli["region_r1"] == pytest.approx(metrics["region_r1"], abs=1e-6)
    reader = build_tower(
        TowerConfig(type="clip", path=str(tmp_path / "cloc" / "image_tower"), select_layer=-1)
    )
    assert_tower_loads_into_mllm(tmp_path / "cloc" / "image_tower", "clip", tokenizer, reader)


def test_cloc_recipes(recipe_world, tmp_path):  # noqa: F811
    from encoders.cloc import ClocEncoderConfig

    check_recipe("cloc-tiny", True, recipe_world, tmp_path)
    big = check_recipe("cloc-b16", False)
    enc = big.model.encoder  # typed when the recipe loaded
    assert (
        isinstance(enc, ClocEncoderConfig) and enc.cloc.regions_per_image == 4 and enc.pair().embed_dim == 512
    )


def test_mean_box_reference(tmp_path):
    rows = [
        {
            "id": "a",
            "image": "a.png",
            "width": 100,
            "height": 100,
            "regions": [{"box": [0, 0, 40, 40], "phrase": "x"}, {"box": [20, 20, 60, 60], "phrase": "y"}],
        }
    ]
    path = tmp_path / "regions.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    mean = [0.1, 0.1, 0.5, 0.5]  # the mean training box
    held = [
        {
            "image": "b.png",
            "regions": [{"box": mean, "phrase": "x"}, {"box": [0.6, 0.6, 1.0, 1.0], "phrase": "y"}],
        }
    ]
    got = mean_box_accuracy(held, path)
    assert got["mean_box_acc50"] == 0.5 and got["mean_box_miou"] == pytest.approx(0.5)


def test_cloc_folder_has_one_meta_and_old_folders_still_load(tokenizer, tmp_path):
    """contrastive.json is the folder's one meta file (kind `cloc`, with the CLOC section); a folder saved
    before that (contrastive.json without kind + cloc.json) still loads; a newer version is refused."""
    import shutil

    from encoders.cloc import is_cloc_dir
    from encoders.common import FormatError

    model = _cloc(tokenizer).eval()
    model.save_pretrained(tmp_path / "new")
    meta = json.loads((tmp_path / "new" / "contrastive.json").read_text())
    assert (meta["kind"], meta["format_version"]) == ("cloc", 1) and "cloc" in meta
    assert not (tmp_path / "new" / "cloc.json").exists() and is_cloc_dir(tmp_path / "new")
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)
    del meta["kind"]
    (old / "cloc.json").write_text(json.dumps({"format_version": 1, "cloc": meta.pop("cloc")}))
    (old / "contrastive.json").write_text(json.dumps(meta))
    assert is_cloc_dir(old)
    back = ClocModel.from_pretrained(old)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    (old / "contrastive.json").write_text(json.dumps(dict(meta, format_version=3)))
    with pytest.raises(FormatError, match="'cloc' format_version 3 is newer"):
        ClocModel.from_pretrained(old)
    (old / "contrastive.json").write_text(json.dumps(dict(meta, kind="tips")))
    with pytest.raises(FormatError, match="holds a saved 'tips', not 'cloc'"):
        ClocModel.from_pretrained(old)
