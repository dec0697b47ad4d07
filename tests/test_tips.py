"""encoders.tips: CLS1 <-> short and CLS2 <-> long captions, DINO + iBOT on top, the data, and the saved
`dinov2_registers` tower in a MultimodalLM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_ssl import TINY_DISTILL, assert_tower_loads_into_mllm, check_recipe, recipe_world  # noqa: F401

from encoders.contrastive import ContrastiveModel, EncoderConfig
from encoders.ssl import AugmentConfig, DistillConfig
from encoders.text_tower import TextTowerConfig, build_text_tower
from encoders.tips import TipsCollator, TipsConfig, TipsDataset, TipsModel
from encoders.towers import TowerConfig, build_tower

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
    total = out.stats["short"] + out.stats["long"] + out.stats["dino"] + out.stats["ibot"]
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
    from encoders.contrastive import encoder_config
    from encoders.tips import tips_config

    check_recipe("tips-tiny", True, recipe_world, tmp_path)
    big = check_recipe("tips-b14", False)
    enc = dict(big.model.encoder)
    tips = tips_config(enc.pop("tips"))
    assert (
        tips.distill.out_dim == 65536
        and tips.augment.local_crops == 6
        and encoder_config(enc).embed_dim == 512
    )
    assert big.model.tower.config["num_register_tokens"] == 1 and big.model.tower.type == "dinov2_registers"
