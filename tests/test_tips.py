"""encoders.tips: CLS1 <-> short and CLS2 <-> long captions, DINO + iBOT on top, the data (mllm.data.views), the
dense probe (`mllm probe dense`), and the saved `dinov2_registers` tower in a MultimodalLM."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_ssl import TINY_DISTILL, assert_tower_loads_into_mllm, check_recipe, recipe_world  # noqa: F401

from encoders.contrastive import ContrastiveModel, EncoderConfig
from encoders.ssl import AugmentConfig, DistillConfig
from encoders.text_tower import TextTowerConfig, build_text_tower
from encoders.tips import TipsConfig, TipsModel
from encoders.towers import TowerConfig, build_tower
from mllm.data.views import TipsCollator, TipsDataset

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


def _tips(tokenizer, registers: int = 1, tower_type: str = "dinov2_registers") -> TipsModel:
    torch.manual_seed(0)
    cfg = EncoderConfig(objective="clip", embed_dim=16, text=TextTowerConfig(config=TINY_TEXT, max_length=64))
    extra = {"num_register_tokens": registers} if tower_type == "dinov2_registers" else {}
    tower = build_tower(TowerConfig(type=tower_type, config={**TINY_VIT, **extra}, select_layer=-1))
    tips = TipsConfig(distill=DistillConfig(**TINY_DISTILL), augment=AugmentConfig(local_crops=0))
    return TipsModel(tower, build_text_tower(cfg.text, tokenizer), cfg, tips=tips)


def _batch(model: TipsModel) -> dict:
    torch.manual_seed(1)
    short = ["red circle", "shapes", "a blue thing", "triangle"]
    long = [
        "A large red circle at the top left.",
        "A small blue square.",
        "A green triangle pointing up.",
        "Two shapes: a red circle and a blue square.",
    ]
    ids, mask = model.text_tower.tokenize(short)
    lids, lmask = model.text_tower.tokenize(long)
    masks = torch.zeros(4, 2, 16, dtype=torch.bool)
    masks[0, 0, :5] = True
    masks[2, 1, 3:9] = True
    return {
        "pixel_values": torch.randn(4, 3, 32, 32),
        "input_ids": ids,
        "attention_mask": mask,
        "long_input_ids": lids,
        "long_attention_mask": lmask,
        "global_views": torch.randn(4, 2, 3, 32, 32),
        "masks": masks,
    }


def test_cls1_pairs_with_the_short_caption_and_cls2_with_the_long_one(tokenizer):
    model = _tips(tokenizer)
    model.train()
    b = _batch(model)
    out = model(**b)
    hidden = model.image_tower.model(pixel_values=b["pixel_values"]).last_hidden_state
    cls1 = F.normalize(model.heads.image_proj(hidden[:, 0]), dim=-1)
    cls2 = F.normalize(model.cls2_proj(hidden[:, 1]), dim=-1)  # the first register: the second CLS
    short = model.encode_text(b["input_ids"], b["attention_mask"])
    long = model.encode_text(b["long_input_ids"], b["long_attention_mask"])
    scale = model.logit_scale()
    assert out.stats["short"] == pytest.approx(model.objective(cls1, short, scale, None)[0].item(), rel=1e-5)
    assert out.stats["long"] == pytest.approx(model.objective(cls2, long, scale, None)[0].item(), rel=1e-5)
    # and not the other way round
    assert out.stats["short"] != pytest.approx(model.objective(cls2, short, scale, None)[0].item(), rel=1e-3)
    assert out.stats["long"] != pytest.approx(model.objective(cls1, long, scale, None)[0].item(), rel=1e-3)
    # CLS1 is what a plain ContrastiveModel reads from the same weights
    assert torch.allclose(model.encode_image(b["pixel_values"]), cls1, atol=1e-6)
    total = float(out.stats["short"] + out.stats["long"] + out.stats["dino"] + out.stats["ibot"])
    assert out.loss.item() == pytest.approx(total, rel=1e-5)


def test_each_caption_loss_trains_only_its_own_cls_path(tokenizer):
    model = _tips(tokenizer)
    model.tips_cfg.short_weight, model.tips_cfg.long_weight = 0.0, 1.0
    model.tips_cfg.distill.dino_weight = model.tips_cfg.distill.ibot_weight = 0.0
    model(**_batch(model)).loss.backward()
    assert model.cls2_proj.weight.grad.abs().sum() > 0
    assert model.heads.image_proj.weight.grad is None or model.heads.image_proj.weight.grad.abs().sum() == 0
    model.zero_grad(set_to_none=True)
    model.tips_cfg.short_weight, model.tips_cfg.long_weight = 1.0, 0.0
    model(**_batch(model)).loss.backward()
    assert model.heads.image_proj.weight.grad.abs().sum() > 0
    assert model.cls2_proj.weight.grad is None or model.cls2_proj.weight.grad.abs().sum() == 0


def test_tips_needs_a_second_cls(tokenizer):
    with pytest.raises(ValueError, match="second CLS"):
        _tips(tokenizer, tower_type="dinov2")
    with pytest.raises(ValueError, match="second CLS"):
        _tips(tokenizer, registers=0)


def test_tips_data_from_geoworld(tokenizer, tmp_path):
    from mllm.data.geoworld import write_world

    write_world(
        tmp_path / "w",
        seed=4,
        n=6,
        size=48,
        n_eval=8,
        mmvp_pairs=2,
        pope_questions=6,
        refcoco_n=2,
        mathverse_problems=1,
    )
    model = _tips(tokenizer)
    ds = TipsDataset(tmp_path / "w" / "captions.jsonl", tmp_path / "w", model.image_tower, model.tips_cfg)
    batch = TipsCollator(model.text_tower.tokenize)([ds[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["global_views"].shape == (3, 2, 3, 32, 32)
    assert batch["masks"].shape == (3, 2, 16) and batch["long_input_ids"].shape[0] == 3
    assert not torch.equal(batch["input_ids"], batch["long_input_ids"][:, : batch["input_ids"].shape[1]])
    out = model(**{k: v for k, v in batch.items() if k not in ("skips", "ids")})
    assert torch.isfinite(out.loss)
    # the dense probe of an untrained tower on the same world (`mllm probe dense`), printed and written
    from mllm.cli import main

    result = tmp_path / "probe.json"
    tower = json.dumps({**TINY_VIT, "num_register_tokens": 1})
    assert (
        main(
            [
                "probe",
                "dense",
                "--type",
                "dinov2_registers",
                "--random",
                tower,
                "--world",
                str(tmp_path / "w"),
                "--train-limit",
                "4",
                "--steps",
                "3",
                "--out",
                str(result),
            ]
        )
        == 0
    )
    probe = json.loads(result.read_text())
    assert probe["tower"] == "random dinov2_registers" and 0 <= probe["shape_fg_acc"] <= 1
    assert probe["train_patches"] > 0 and probe["test_patches"] > 0


def test_tips_saves_loads_and_its_tower_goes_into_multimodal_lm(tokenizer, tmp_path):
    model = _tips(tokenizer)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    b = _batch(model)
    for _ in range(2):
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().save_pretrained(tmp_path / "tips")
    back = TipsModel.from_pretrained(tmp_path / "tips")
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    plain = ContrastiveModel.from_pretrained(tmp_path / "tips")
    assert torch.allclose(
        plain.encode_image(b["pixel_values"]), model.encode_image(b["pixel_values"]), atol=1e-6
    )
    reader = build_tower(
        TowerConfig(type="dinov2_registers", path=str(tmp_path / "tips" / "image_tower"), select_layer=-1)
    )
    assert reader.num_prefix_tokens == 2  # CLS + the register acting as CLS2: neither reaches the MLLM
    assert_tower_loads_into_mllm(
        tmp_path / "tips" / "image_tower", "dinov2_registers", tokenizer, model.image_tower
    )


def test_tips_recipes(recipe_world, tmp_path):  # noqa: F811
    from encoders.tips import TipsEncoderConfig

    check_recipe("tips-tiny", True, recipe_world, tmp_path)
    big = check_recipe("tips-b14", False)
    enc = big.model.encoder  # typed when the recipe loaded
    assert isinstance(enc, TipsEncoderConfig)
    assert (
        enc.tips.distill.out_dim == 65536
        and enc.tips.augment.local_crops == 6
        and enc.pair().embed_dim == 512
    )
    assert big.model.tower.config["num_register_tokens"] == 1 and big.model.tower.type == "dinov2_registers"


def test_tips_folder_has_one_meta_and_old_folders_still_load(tokenizer, tmp_path):
    """contrastive.json is the folder's one meta file (kind `tips`, with the TIPS section); a folder saved
    before that (contrastive.json without kind + tips.json) still loads; a newer version is refused."""
    import shutil

    from encoders.common import FormatError
    from encoders.tips import is_tips_dir

    model = _tips(tokenizer).eval()
    model.save_pretrained(tmp_path / "new")
    meta = json.loads((tmp_path / "new" / "contrastive.json").read_text())
    assert (meta["kind"], meta["format_version"]) == ("tips", 1) and "tips" in meta
    assert not (tmp_path / "new" / "tips.json").exists() and is_tips_dir(tmp_path / "new")
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)
    del meta["kind"]
    (old / "tips.json").write_text(json.dumps({"format_version": 1, "tips": meta.pop("tips")}))
    (old / "contrastive.json").write_text(json.dumps(meta))
    assert is_tips_dir(old)
    back = TipsModel.from_pretrained(old)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    assert ContrastiveModel.from_pretrained(old).cfg.embed_dim == model.cfg.embed_dim
    (old / "contrastive.json").write_text(json.dumps(dict(meta, format_version=2)))
    with pytest.raises(FormatError, match="'tips' format_version 2 is newer"):
        TipsModel.from_pretrained(old)
    # a plain contrastive folder is not a TIPS one
    ContrastiveModel.from_pretrained(tmp_path / "new").save_pretrained(tmp_path / "clip")
    assert not is_tips_dir(tmp_path / "clip")
    with pytest.raises(FormatError, match="holds a saved 'contrastive', not 'tips'"):
        TipsModel.from_pretrained(tmp_path / "clip")
