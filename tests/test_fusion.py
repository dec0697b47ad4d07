"""Mixture of Features (encoders.fusion) and fused MultimodalLMs (mllm.vision): order, α limits, token
counts, what trains, save/load, and a tiny align + instruct under DeepSpeed for each fused model."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from helpers import tiny_recipe, write_tiny_world
from PIL import Image

from encoders.fusion import MixtureOfFeatures, StreamProjectors, interleave
from encoders.geo import GeoConfig
from encoders.towers import TINY_CONFIGS, TowerConfig, VisionFeatures
from mllm.config import FusionConfig, recipe_from_dict
from mllm.families import resolve_trainable
from mllm.model import MultimodalLM, build_lm
from mllm.training.optim import set_trainable
from mllm.training.runner import build_model, train_recipe

REPO = Path(__file__).resolve().parents[1]
TINY_LM = dict(
    model_type="llama",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
CLIP = TowerConfig(type="clip", config=TINY_CONFIGS["clip"])
DINO = TowerConfig(type="dinov2", config=TINY_CONFIGS["dinov2"])
TINY_GEO = GeoConfig(image_size=64, channels=[8, 16, 16, 24], fpn_dim=16, attn_heads=2)


def _feats(b: int, grid: tuple[int, int], d: int, seed: int) -> VisionFeatures:
    g = torch.Generator().manual_seed(seed)
    return VisionFeatures(tokens=torch.randn(b, grid[0] * grid[1], d, generator=g), grid=grid)


def _model(tokenizer, fusion: FusionConfig | None, seed: int = 0) -> MultimodalLM:
    torch.manual_seed(seed)
    lm = build_lm(None, TINY_LM, len(tokenizer))
    return MultimodalLM.build(CLIP, "mlp2x_gelu", lm, tokenizer, max_length=256, fusion=fusion)


def _images(n: int = 2) -> list[Image.Image]:
    ims = []
    for i in range(n):
        im = Image.new("RGB", (72, 64), "white")
        im.paste((200, 30 * i, 30), (8 + 10 * i, 8, 40 + 10 * i, 40))
        ims.append(im)
    return ims


# ------------------------------------------------------------------------------------------ the mixture
def test_interleave_order_and_shape():
    a = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    b = -a - 1
    out = interleave(a, b)
    assert out.shape == (2, 6, 4)
    for i in range(3):
        assert torch.equal(out[:, 2 * i], a[:, i]) and torch.equal(out[:, 2 * i + 1], b[:, i])


def test_interleaved_mof_projects_each_stream_then_interleaves():
    first, second = _feats(2, (4, 4), 16, 0), _feats(2, (4, 4), 24, 1)  # widths may differ
    p1, p2 = torch.nn.Linear(16, 8), torch.nn.Linear(24, 8)
    mof = MixtureOfFeatures("interleaved")
    mof.check((16, (4, 4)), (24, (4, 4)))
    out = mof(first, second, [p1, p2])
    assert out.shape == (2, 32, 8) and mof.num_tokens(16) == 32
    assert torch.allclose(out[:, 0::2], p1(first.tokens)) and torch.allclose(out[:, 1::2], p2(second.tokens))


def test_additive_alpha_limits_equal_one_tower():
    first, second = _feats(2, (4, 4), 16, 0), _feats(2, (4, 4), 16, 1)
    proj = torch.nn.Linear(16, 8)
    assert torch.equal(MixtureOfFeatures("additive", alpha=1.0)(first, second, [proj]), proj(first.tokens))
    assert torch.equal(MixtureOfFeatures("additive", alpha=0.0)(first, second, [proj]), proj(second.tokens))
    half = MixtureOfFeatures("additive", alpha=0.5)(first, second, [proj])
    assert torch.allclose(half, proj(0.5 * first.tokens + 0.5 * second.tokens), atol=1e-6)
    assert MixtureOfFeatures("additive").num_tokens(16) == 16


def test_mismatches_are_refused_or_resampled_when_declared():
    with pytest.raises(ValueError, match="widths must match"):
        MixtureOfFeatures("additive").check((16, (4, 4)), (24, (4, 4)))
    with pytest.raises(ValueError, match="resample=bilinear"):
        MixtureOfFeatures("interleaved").check((16, (4, 4)), (16, (2, 2)))
    with pytest.raises(ValueError, match="alpha"):
        MixtureOfFeatures("additive", alpha=1.5)
    mof = MixtureOfFeatures("additive", alpha=0.0, resample="bilinear")
    mof.check((16, (4, 4)), (16, (2, 2)))
    coarse = VisionFeatures(tokens=torch.ones(1, 4, 16) * torch.arange(16.0), grid=(2, 2))  # constant map
    out = mof(_feats(1, (4, 4), 16, 0), coarse, [torch.nn.Identity()])
    assert out.shape == (1, 16, 16) and torch.allclose(out, torch.ones(1, 16, 16) * torch.arange(16.0))


# ------------------------------------------------------------------------------------------ fused models
@pytest.mark.parametrize(
    "fusion,tokens",
    [
        (FusionConfig(type="mof_interleaved", tower2=DINO), 128),
        (FusionConfig(type="mof_additive", tower2=DINO, alpha=0.25), 64),
        (FusionConfig(type="router", geo=TINY_GEO), 64),
    ],
)
def test_fused_model_token_count_and_placeholder_expansion(tokenizer, fusion, tokens):
    from mllm.chat import encode_conversation

    m = _model(tokenizer, fusion).eval()
    assert m.num_image_tokens == tokens
    pix = m.preprocess(_images())
    assert pix.shape == (2, 3, 64, 64) and 0.0 <= float(pix.min()) and float(pix.max()) <= 1.0
    with torch.no_grad():
        emb = m.encode_images(pix)
    assert emb.shape == (2, tokens, 32)
    conv = [{"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "red"}]
    enc = encode_conversation(conv, tokenizer, "chatml", m.image_token_id, m.num_image_tokens, 1)
    out = m(input_ids=enc["input_ids"][None], labels=enc["labels"][None], pixel_values=pix[:1])
    assert torch.isfinite(out.loss)


def test_interleaved_model_streams_match_each_tower(tokenizer):
    from mllm.vision import tower_input

    m = _model(tokenizer, FusionConfig(type="mof_interleaved", tower2=DINO)).eval()
    assert isinstance(m.projector, StreamProjectors)
    pix = m.preprocess(_images())
    with torch.no_grad():
        emb = m.encode_images(pix)
        c = m.projector[0](m.tower(tower_input(m.tower, pix)).tokens)
        d = m.projector[1](m.tower2(tower_input(m.tower2, pix)).tokens)
    assert torch.allclose(emb[:, 0::2], c, atol=1e-6) and torch.allclose(emb[:, 1::2], d, atol=1e-6)
    # each tower normalises the shared pixels with its own processor's statistics
    assert not torch.allclose(tower_input(m.tower, pix), tower_input(m.tower2, pix))


def test_single_tower_layout_is_unchanged(tokenizer, tmp_path):
    m = _model(tokenizer, None)
    assert m.fusion is None and {k.split(".")[0] for k in m.state_dict()} == {"tower", "projector", "lm"}
    m.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "lm",
        "mllm.json",
        "projector.safetensors",
        "tokenizer",
        "tower",
    ]
    meta = json.loads((tmp_path / "m" / "mllm.json").read_text())
    assert "fusion" not in meta and set(meta) == {
        "tower",
        "projector",
        "image_token",
        "image_token_id",
        "template",
        "max_length",
        "box_format",
        "format_version",
        "kind",
    }
    assert meta["kind"] == "mllm"


@pytest.mark.parametrize(
    "fusion,files",
    [
        (FusionConfig(type="mof_interleaved", tower2=DINO), {"tower2"}),
        (FusionConfig(type="mof_additive", tower2=DINO, alpha=0.75), {"tower2"}),
        (FusionConfig(type="router", geo=TINY_GEO), {"geo", "router.safetensors"}),
        (FusionConfig(type="router", geo=TINY_GEO, router_mode="constant"), {"geo", "router.safetensors"}),
    ],
)
def test_fused_save_then_from_pretrained_gives_identical_logits(tokenizer, tmp_path, fusion, files):
    m = _model(tokenizer, fusion).eval()
    with torch.no_grad():  # make every part non-trivial (a fresh projector could hide a missing load)
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    m.save_pretrained(tmp_path / "m")
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert files | {"tower", "lm", "projector.safetensors", "mllm.json"} <= names
    meta = json.loads((tmp_path / "m" / "mllm.json").read_text())
    assert meta["fusion"]["type"] == fusion.type
    back = MultimodalLM.from_pretrained(tmp_path / "m")
    assert back.num_image_tokens == m.num_image_tokens
    assert set(back.state_dict()) == set(m.state_dict())
    ids = torch.tensor([[1] + [m.image_token_id] * m.num_image_tokens + [5, 6, 7]])
    pix = m.preprocess(_images(1))
    with torch.no_grad():
        a, b = m(input_ids=ids, pixel_values=pix).logits, back(input_ids=ids, pixel_values=pix).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "fusion,expect",
    [
        (FusionConfig(type="mof_interleaved", tower2=DINO), {"projector"}),
        (FusionConfig(type="router", geo=TINY_GEO), {"projector", "router"}),
    ],
)
def test_align_gradients_reach_exactly_projectors_and_router(tokenizer, fusion, expect):
    from mllm.config import StageConfig

    m = _model(tokenizer, fusion)
    trainable = resolve_trainable(StageConfig(kind="align", lr=1e-3), m)
    assert set(trainable) == expect
    set_trainable(m, trainable)
    ids = torch.tensor([[1] + [m.image_token_id] * m.num_image_tokens + [5, 6, 7]])
    out = m(input_ids=ids, pixel_values=m.preprocess(_images(1)), labels=ids.clone())
    out.loss.backward()
    for name, p in m.named_parameters():
        top = name.split(".")[0]
        if top in expect:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # instruct: the LLM too; still never the towers or the geometric encoder
    assert set(resolve_trainable(StageConfig(kind="instruct", lr=1e-3), m)) == expect | {"lm"}


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_tiny_world(tmp_path_factory.mktemp("world"), n=24, size=64)


def _fused_recipe(world, fusion: dict) -> dict:
    r = tiny_recipe(world, "deepspeed", str(REPO / "train/ds/zero2.json"), steps=(3, 3))
    r["model"]["tower"] = {"type": "clip", "config": dict(TINY_CONFIGS["clip"])}
    r["model"]["fusion"] = fusion
    r["model"]["max_length"] = 256
    r["model"]["lm"]["config"]["max_position_embeddings"] = 512
    r["stages"][1]["trainable"] = {
        "projector": 3e-3,
        "lm": 3e-3,
        **({"router": 3e-4} if "geo" in fusion else {}),
    }
    return r


@pytest.mark.slow
@pytest.mark.parametrize(
    "fusion",
    [
        {"type": "mof_interleaved", "tower2": asdict(DINO)},
        {"type": "mof_additive", "alpha": 0.5, "tower2": asdict(DINO)},
        {"type": "router", "geo": asdict(TINY_GEO)},
    ],
)
def test_fused_align_then_instruct_under_deepspeed(world, tmp_path, fusion):
    recipe = recipe_from_dict(_fused_recipe(world, fusion))
    start = build_model(recipe.model, tmp_path / "run", [world["align"]], seed=0).state_dict()
    summary = train_recipe(recipe, tmp_path / "run", log=lambda *a: None)
    align = MultimodalLM.from_pretrained(tmp_path / "run" / "align" / "final")
    final = MultimodalLM.from_pretrained(summary["final"])
    trains_align = {"projector", "router"}
    for k, v in align.state_dict().items():
        assert (not torch.equal(v, start[k])) == (k.split(".")[0] in trains_align), k
    for k, v in final.state_dict().items():
        if k.split(".")[0] in ("tower", "tower2", "geo"):
            assert torch.equal(v, start[k]), k
    assert not torch.equal(final.state_dict()["lm.model.norm.weight"], start["lm.model.norm.weight"])
    # the saved model reloads to identical logits
    final.save_pretrained(tmp_path / "again")
    again = MultimodalLM.from_pretrained(tmp_path / "again")
    ids = torch.tensor([[1] + [final.image_token_id] * final.num_image_tokens + [5, 6]])
    pix = final.preprocess(_images(1))
    with torch.no_grad():
        assert torch.equal(
            final(input_ids=ids, pixel_values=pix).logits, again(input_ids=ids, pixel_values=pix).logits
        )


# ------------------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize(
    "name,kind",
    [
        ("mof-tiny", "mof_interleaved"),
        ("mof-additive-tiny", "mof_additive"),
        ("geoglip-tiny", "router"),
        ("svemath-tiny", "router"),
        ("mof-7b", "mof_interleaved"),
        ("svemath-qwen2.5-7b", "router"),
    ],
)
def test_fusion_recipes_parse(name, kind):
    from mllm.config import load_recipe
    from mllm.families import get_stage_kind
    from mllm.vision import build_fusion

    recipe = load_recipe(REPO / "train" / "recipes" / f"{name}.yaml")
    assert recipe.model.fusion is not None and recipe.model.fusion.type == kind
    build_fusion(recipe.model.fusion)  # the fusion entry is complete (tower2 / geo present)
    for stage in recipe.stages:
        get_stage_kind(stage.kind)
    if name == "svemath-qwen2.5-7b":
        instruct = recipe.stage("instruct")
        assert instruct.zero_config == "train/ds/zero3.json"
        assert instruct.trainable["router"] < instruct.trainable["lm"]
