"""encoders.ContrastiveModel, the `contrastive` stage, the model-kind registry and GeoWorld hard negatives."""

from __future__ import annotations

import json
import math
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import TINY_TOWER
from helpers import tiny_recipe, write_tiny_world

from encoders.contrastive import ContrastiveModel, EncoderConfig
from encoders.text_tower import TextTowerConfig, build_text_tower
from encoders.towers import TINY_CONFIGS, TowerConfig, build_tower
from mllm.config import ConfigError, recipe_from_dict
from mllm.data.captions import CaptionCollator, CaptionDataset
from mllm.data.conversations import DataError
from mllm.data.geoworld import write_world
from mllm.data.geoworld.negatives import hard_negatives
from mllm.data.geoworld.sampling import stream
from mllm.data.geoworld.scene import sample_scene
from mllm.data.geoworld.vocab import COLOR_NAMES, SHAPES
from mllm.families import FAMILIES, get_family, register_family, saved_family
from mllm.model import MultimodalLM
from mllm.training.runner import resolve_model_dir, train_recipe

REPO = Path(__file__).resolve().parents[1]
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=96,
)


def _model(tokenizer, objective: str = "clip") -> ContrastiveModel:
    torch.manual_seed(0)
    cfg = EncoderConfig(
        objective=objective, embed_dim=16, text=TextTowerConfig(config=TINY_TEXT, max_length=96)
    )
    return ContrastiveModel(
        build_tower(TowerConfig(type="clip", config=TINY_TOWER, select_layer=-1)),
        build_text_tower(cfg.text, tokenizer),
        cfg,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("geoworld")
    write_world(
        out,
        seed=3,
        n=48,
        size=48,
        n_eval=16,
        mmvp_pairs=8,
        pope_questions=6,
        refcoco_n=4,
        mathverse_problems=1,
        mmvp_vlm_pairs=2,
    )
    return out


def _recipe(
    world: Path,
    objective: str = "clip",
    backend: str = "torch",
    zero: str | None = None,
    steps: int = 4,
    checkpoint_every: int = 0,
) -> dict:
    return {
        "name": "ctest",
        "model": {
            "kind": "contrastive",
            "tower": {"type": "clip", "config": TINY_TOWER, "select_layer": -1},
            "tokenizer": {"vocab_size": 400},
            "encoder": {
                "objective": objective,
                "embed_dim": 16,
                "text": {"config": TINY_TEXT, "max_length": 96},
            },
        },
        "stages": [
            {
                "name": "contrastive",
                "kind": "contrastive",
                "data": {"json": str(world / "captions.jsonl"), "images": str(world)},
                "lr": 2e-3,
                "batch_size": 8,
                "max_steps": steps,
                "warmup_ratio": 0.0,
            }
        ],
        "engine": {
            "backend": backend,
            "zero_config": zero,
            "precision": "fp32",
            "seed": 0,
            "checkpoint_every": checkpoint_every,
            "keep_last": 2,
            "progress": False,
        },
    }


def _losses(stage_dir: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (stage_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- the model


def test_embeddings_are_normalised_and_padding_does_not_change_them(tokenizer):
    model = _model(tokenizer, "filip").eval()
    pv = torch.randn(3, 3, 32, 32)
    img, img_tok = model.encode_image(pv, tokens=True)
    assert img.shape == (3, 16) and img_tok.shape == (3, 16, 16)  # 4x4 patches, CLS dropped
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    short, long = "red", "A large red circle at the top left and a small blue triangle pointing up."
    ids, mask = model.text_tower.tokenize([short, long])
    assert ids[0, 0] == tokenizer.bos_token_id and mask[0].sum() < mask[1].sum()
    assert ids[0, int(mask[0].sum()) - 1] == tokenizer.eos_token_id
    alone = model.encode_text(*model.text_tower.tokenize([short]))
    batched, tok = model.encode_text(ids, mask, tokens=True)
    # pooled at the EOS, so right padding in a batch with a longer caption changes nothing
    assert torch.allclose(batched[0], alone[0], atol=1e-5)
    assert tok.shape[:2] == ids.shape and torch.allclose(batched.norm(dim=-1), torch.ones(2), atol=1e-5)


def _pictures(n: int):
    from PIL import Image

    return [Image.new("RGB", (32, 32), (40 * i, 200 - 30 * i, 90)) for i in range(n)]


def test_match_scores_rank_as_the_objective_compares_pairs(tokenizer):
    """CLIP: the global cosine, both directions one matrix. FILIP: its token-wise late interaction (what
    it trains; its global embeddings are not), each direction its own, and not the cosine."""
    from encoders.objectives import late_interaction

    texts = ["red", "a blue circle at the top", "green square"]
    clip = _model(tokenizer, "clip").eval()
    i2t, t2i = clip.match_scores(_pictures(2), texts)
    want = clip.embed_images(_pictures(2)) @ clip.embed_texts(texts).T
    torch.testing.assert_close(i2t, want)
    torch.testing.assert_close(t2i, want.T)
    filip = _model(tokenizer, "filip").eval()
    i2t, t2i = filip.match_scores(_pictures(2), texts)
    assert i2t.shape == (2, 3) and t2i.shape == (3, 2)
    _, img_tok = filip.encode_image(filip.image_tower.preprocess(_pictures(2)), tokens=True)
    ids, mask = filip.text_tower.tokenize(texts)
    _, txt_tok = filip.encode_text(ids, mask, tokens=True)
    torch.testing.assert_close(i2t, late_interaction(img_tok, None, txt_tok, mask.bool(), 4))
    torch.testing.assert_close(t2i, late_interaction(txt_tok, mask.bool(), img_tok, None, 4))
    cosine = filip.embed_images(_pictures(2)) @ filip.embed_texts(texts).T
    assert not torch.allclose(i2t, cosine, atol=1e-3)


def test_truncation_keeps_the_eos(tokenizer):
    model = _model(tokenizer)
    model.text_tower.config.max_length = 6
    ids, mask = model.text_tower.tokenize(["A large red circle at the top left and a small blue triangle"])
    assert ids.shape == (1, 6) and ids[0, -1] == tokenizer.eos_token_id


def test_forward_loss_for_each_objective_and_its_extras(tokenizer):
    batch = {"pixel_values": torch.randn(4, 3, 32, 32)}
    batch["input_ids"], batch["attention_mask"] = _model(tokenizer).text_tower.tokenize(
        ["red", "blue circle", "green", "What shape is the blue object?"]
    )
    hard = _model(tokenizer).text_tower.tokenize(
        ["blue", "red circle", "yellow", "What shape is the red object?"]
    )
    for objective in ("clip", "siglip", "filip", "dcl", "negclip"):
        model = _model(tokenizer, objective)
        assert (model.heads.logit_bias is not None) == (objective == "siglip")
        if objective == "negclip":
            with pytest.raises(ValueError, match="hard negative"):
                model(**batch)
            out = model(**batch, hard_input_ids=hard[0], hard_attention_mask=hard[1])
        else:
            out = model(**batch)
        assert out.loss.dim() == 0 and torch.isfinite(out.loss), objective
        out.loss.backward()
        assert (
            model.heads.logit_scale.grad is not None
            and model.image_tower.model.embeddings.patch_embedding.weight.grad is not None
        )


def test_save_load_round_trip_and_the_tower_is_an_mllm_tower(tokenizer, tmp_path):
    model = _model(tokenizer, "siglip").eval()
    with torch.no_grad():
        model.heads.logit_bias.fill_(-3.5)
    model.save_pretrained(tmp_path / "enc")
    assert not list(tmp_path.glob(".tmp-*"))
    back = ContrastiveModel.from_pretrained(tmp_path / "enc")
    pv = torch.randn(2, 3, 32, 32)
    ids, mask = model.text_tower.tokenize(["red circle", "blue"])
    assert torch.equal(model.encode_image(pv), back.encode_image(pv))
    assert torch.equal(model.encode_text(ids, mask), back.encode_text(ids, mask))
    assert back.heads.logit_bias.item() == -3.5 and back.cfg.objective == "siglip"
    # image_tower/ is an ordinary HF directory that the tower registry (and so MultimodalLM) loads
    tower = build_tower(TowerConfig(type="clip", path=str(tmp_path / "enc" / "image_tower"), select_layer=-1))
    for k, v in model.image_tower.model.state_dict().items():
        assert torch.equal(v, tower.model.state_dict()[k]), k
    from mllm.model import build_lm

    lm = build_lm(
        None,
        dict(
            model_type="llama",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        ),
        len(tokenizer),
    )
    mllm = MultimodalLM.build(
        TowerConfig(type="clip", path=str(tmp_path / "enc" / "image_tower"), select_layer=-1),
        "mlp2x_gelu",
        lm,
        tokenizer,
    )
    assert torch.equal(mllm.tower(pv).tokens, model.image_tower(pv).tokens)


@pytest.mark.parametrize("type_", ["resnet", "convnext"])
def test_conv_image_tower_trains_and_becomes_an_mllm_tower(type_, tokenizer, tmp_path):
    """A ResNet / ConvNeXt image tower under the default pooling ("pooler": the HF model's pooler_output)."""
    torch.manual_seed(0)
    cfg = EncoderConfig(objective="clip", embed_dim=16, text=TextTowerConfig(config=TINY_TEXT, max_length=96))
    model = ContrastiveModel(
        build_tower(TowerConfig(type=type_, config=TINY_CONFIGS[type_])),
        build_text_tower(cfg.text, tokenizer),
        cfg,
    )
    pv = torch.randn(4, 3, 64, 64)
    ids, mask = model.text_tower.tokenize(["red", "blue circle", "green", "a small blue triangle"])
    out = model.train()(pixel_values=pv, input_ids=ids, attention_mask=mask)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    stem = next(p for p in model.image_tower.parameters() if p.dim() == 4)
    assert stem.grad is not None and model.heads.image_proj.weight.grad is not None
    model.eval()
    img, tok = model.encode_image(pv, tokens=True)
    assert img.shape == (4, 16) and tok.shape == (4, 64, 16)  # the final 8x8 map, no prefix tokens
    model.save_pretrained(tmp_path / "enc")
    assert (
        json.loads((tmp_path / "enc" / "contrastive.json").read_text())["image_tower"]["select_layer"] == -1
    )
    back = ContrastiveModel.from_pretrained(tmp_path / "enc")
    assert torch.equal(back.encode_image(pv), model.encode_image(pv))
    # image_tower/ is the `model.tower: {type: TYPE, path: .../image_tower}` of a MultimodalLM recipe
    from mllm.model import build_lm

    lm = build_lm(
        None,
        dict(
            model_type="llama",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        ),
        len(tokenizer),
    )
    mllm = MultimodalLM.build(
        TowerConfig(type=type_, path=str(tmp_path / "enc" / "image_tower")), "mlp2x_gelu", lm, tokenizer
    )
    assert mllm.num_image_tokens == 64
    with torch.no_grad():
        assert torch.equal(mllm.eval().tower(pv).tokens, model.image_tower(pv).tokens)


def test_conv_heads_take_the_final_stage_whatever_layer_an_mllm_selects(tokenizer):
    """select_layer=-2 makes the MLLM read 16x16x64 maps; the contrastive heads still pool the 128-wide end."""
    cfg = EncoderConfig(objective="clip", embed_dim=16, text=TextTowerConfig(config=TINY_TEXT, max_length=96))
    tower = build_tower(TowerConfig(type="resnet", config=TINY_CONFIGS["resnet"], select_layer=-2))
    model = ContrastiveModel(tower, build_text_tower(cfg.text, tokenizer), cfg).eval()
    assert (tower.hidden_size, tower.output_size, tower.grid) == (64, 128, (16, 16))
    assert model.heads.image_proj.in_features == 128
    assert model.encode_image(torch.randn(2, 3, 64, 64)).shape == (2, 16)


def test_encoder_config_errors_name_the_key(tokenizer):
    from encoders.contrastive import encoder_config

    with pytest.raises(ConfigError, match="model.encoder"):
        encoder_config({"objectiv": "clip"})
    with pytest.raises(ConfigError, match="image_pool"):
        encoder_config({"image_pool": "max"})
    with pytest.raises(ValueError, match="unknown contrastive objective"):
        _model(tokenizer, "nope")


def test_encoder_config_is_typed_by_kind_and_checked_at_load():
    """`model.encoder` is the family's dataclass (a tagged union on model.kind), checked when the recipe
    loads: an unknown key is refused there, naming it, not when the model is built."""
    from encoders.cloc import ClocEncoderConfig
    from encoders.ssl.config import SSLConfig
    from encoders.tips import TipsEncoderConfig
    from mllm.config import load_recipe

    assert type(load_recipe("clip-tiny").model.encoder) is EncoderConfig
    assert type(load_recipe("tips-tiny").model.encoder) is TipsEncoderConfig
    assert type(load_recipe("cloc-tiny").model.encoder) is ClocEncoderConfig
    assert type(load_recipe("dino-tiny").model.encoder) is SSLConfig
    assert load_recipe("tiny-geoworld").model.encoder is None
    for name, key, known in [
        ("clip-tiny", "model.encoder.objectiv", "'objective'"),
        ("tips-tiny", "model.encoder.tips.short_wieght", "'short_weight'"),
        ("cloc-tiny", "model.encoder.cloc.regions", "'regions_per_image'"),
        ("dino-tiny", "model.encoder.distill.ema", "'ema_momentum'"),
        ("clip-tiny", "model.encoder.tips", "'objective'"),
    ]:  # a TIPS key on a CLIP recipe
        section, bad = key.rsplit(".", 1)
        with pytest.raises(ConfigError, match=rf"{section}: unknown key\(s\) \['{bad}'\]; known: .*{known}"):
            load_recipe(name, [f"{key}=1"])
    with pytest.raises(ConfigError, match="box_dim must be a multiple of 8"):
        load_recipe("cloc-tiny", ["model.encoder.cloc.box_dim=12"])
    with pytest.raises(ConfigError, match="image_pool must be one of"):
        load_recipe("clip-tiny", ["model.encoder.image_pool=max"])
    with pytest.raises(ConfigError, match="takes no encoder section"):
        load_recipe("tiny-geoworld", ["model.encoder.objective=clip"])


def test_contrastive_meta_has_kind_and_old_folders_still_load(tokenizer, tmp_path):
    from encoders.common import FormatError

    model = _model(tokenizer, "clip")
    model.save_pretrained(tmp_path / "enc")
    meta = json.loads((tmp_path / "enc" / "contrastive.json").read_text())
    assert (meta["kind"], meta["format_version"]) == ("contrastive", 1)
    del meta["kind"], meta["format_version"]  # the oldest layout
    (tmp_path / "enc" / "contrastive.json").write_text(json.dumps(meta))
    back = ContrastiveModel.from_pretrained(tmp_path / "enc")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    (tmp_path / "enc" / "contrastive.json").write_text(json.dumps(dict(meta, format_version=2)))
    with pytest.raises(FormatError, match="'contrastive' format_version 2 is newer"):
        ContrastiveModel.from_pretrained(tmp_path / "enc")
    (tmp_path / "enc" / "contrastive.json").write_text(json.dumps(dict(meta, kind="banana")))
    with pytest.raises(FormatError, match="holds a saved 'banana', not 'contrastive' or 'tips' or 'cloc'"):
        ContrastiveModel.from_pretrained(tmp_path / "enc")


def test_model_kind_registry(tmp_path):
    from mllm.config import ModelConfig

    assert {"mllm", "contrastive", "ssl", "tips", "cloc"} <= set(FAMILIES)
    with pytest.raises(ConfigError, match="model.kind 'mllm' takes no encoder section"):  # refused at load
        ModelConfig(encoder={"objective": "clip"})
    with pytest.raises(ValueError, match="unknown model kind"):
        get_family("nope")
    with pytest.raises(ValueError, match="already registered at .*mllm/families/mllm.py"):
        register_family(FAMILIES["mllm"])


# ------------------------------------------------------------------------------------------- data


def test_caption_dataset_modes_and_bad_samples(world, tmp_path):
    rows = [json.loads(ln) for ln in (world / "captions.jsonl").read_text().splitlines()]
    pre = build_tower(TowerConfig(type="clip", config=TINY_TOWER)).preprocess
    ds = CaptionDataset(world / "captions.jsonl", world, pre, "long", hard_negatives=True)
    item = ds[0]
    assert item["text"] == rows[0]["long"] and item["pixel_values"].shape == (1, 3, 32, 32)
    assert item["hard"] in [v for v in rows[0]["negatives"].values() if v]
    assert CaptionDataset(world / "captions.jsonl", world, pre, "short")[1]["text"] == rows[1]["short"]
    random.seed(0)
    seen = {CaptionDataset(world / "captions.jsonl", world, pre, "random")[2]["text"] for _ in range(20)}
    assert seen == {rows[2]["short"], rows[2]["long"]}
    with pytest.raises(ValueError, match="data.caption"):
        CaptionDataset(world / "captions.jsonl", world, pre, "both")

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                rows[0],
                {"id": "nocap", "image": rows[1]["image"]},
                {"id": "noimg", "image": "images/missing.png", "long": "x"},
                {"id": "escape", "image": "../../etc/passwd", "long": "x"},
            ]
        )
        + "\n"
    )
    strict = CaptionDataset(bad, world, pre)
    with pytest.raises(DataError, match=r"bad.jsonl line 2 \(id 'nocap'\).*'long'"):
        strict[1]
    with pytest.raises(DataError, match=r"line 3 \(id 'noimg'\).*not found"):
        strict[2]
    with pytest.raises(DataError, match=r"line 4 \(id 'escape'\).*escapes"):
        strict[3]
    lenient = CaptionDataset(bad, world, pre, skip_bad_samples=True)
    batch = CaptionCollator(_model_tok(world).tokenize)([lenient[i] for i in range(4)])
    assert batch["ids"] == [rows[0]["id"]] and [s.sample.split()[-1] for s in batch["skips"]] == [
        "'nocap')",
        "'noimg')",
        "'escape')",
    ]
    assert batch["input_ids"].shape[0] == 1


def _model_tok(world: Path):
    from mllm.tokenizer import train_tokenizer

    tok = train_tokenizer(
        [json.loads(ln)["long"] for ln in (world / "captions.jsonl").read_text().splitlines()], 300
    )
    return build_text_tower(TextTowerConfig(config=TINY_TEXT), tok)


def test_hard_negatives_are_false_rearrangements_and_deterministic():
    import re

    words = re.compile(r"\w+")
    counted = {"attribute": 0, "relation": 0, "order": 0}
    for i in range(60):
        scene = sample_scene(stream(7, "t", i), 64)
        negs = hard_negatives(scene, stream(7, "neg", i))
        assert negs == hard_negatives(scene, stream(7, "neg", i))
        from mllm.data.geoworld.language import long_caption

        orig = long_caption(scene)
        vocab = set(COLOR_NAMES) | set(SHAPES)
        for kind, text in negs.items():
            if text is None:
                continue
            counted[kind] += 1
            assert text != orig
            if kind == "order":  # same colours and shapes, bound differently
                assert sorted(w for w in words.findall(text) if w in vocab) == sorted(
                    w for w in words.findall(orig) if w in vocab
                )
            a, b = Counter(words.findall(orig.lower())), Counter(words.findall(text.lower()))
            changed = set((a - b) + (b - a))  # words whose count differs
            if kind == "relation":  # only left/right/top/bottom words move
                assert changed and changed <= {"left", "right", "top", "bottom"}
            if kind == "attribute":  # one colour or shape (with the orientation words a shape brings)
                assert changed and changed <= vocab | {
                    "pointing",
                    "up",
                    "down",
                    "left",
                    "right",
                    "horizontal",
                    "vertical",
                }
    assert min(counted.values()) > 20, counted


# ------------------------------------------------------------------------------------------- training


def test_contrastive_stage_trains_and_resumes_under_zero2(world, tmp_path):
    rec = _recipe(world, "clip", "deepspeed", str(REPO / "train/ds/zero2.json"), steps=4, checkpoint_every=2)
    ref = train_recipe(recipe_from_dict(rec), tmp_path / "ref", log=lambda *a: None)
    want = _losses(tmp_path / "ref" / "contrastive")
    assert len(want) == 4 and all(torch.isfinite(torch.tensor(want)))
    final = Path(ref["final"])
    assert (
        saved_family(final).name == "contrastive"
        and resolve_model_dir(tmp_path / "ref", "contrastive") == final
    )
    with pytest.raises(FileNotFoundError):
        resolve_model_dir(tmp_path / "ref")  # not an mllm model
    trained = ContrastiveModel.from_pretrained(final)
    init = get_family("contrastive").build(recipe_from_dict(rec).model, tmp_path / "ref", [], 0)
    for prefix in ("image_tower", "text_tower", "heads"):
        a, b = dict(init.named_parameters()), dict(trained.named_parameters())
        assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix)), prefix

    # A run that died after its step-2 checkpoint resumes there and repeats the same loss sequence.
    shutil.copytree(tmp_path / "ref", tmp_path / "crash")
    ck = tmp_path / "crash" / "contrastive" / "checkpoints"
    shutil.rmtree(ck / "step-00000004")
    (ck / "latest").write_text("step-00000002\n")
    shutil.rmtree(tmp_path / "crash" / "contrastive" / "final")
    (tmp_path / "crash" / "run.json").unlink()
    again = train_recipe(recipe_from_dict(rec), tmp_path / "crash", log=lambda *a: None)
    assert again["stages"]["contrastive"]["resumed_from"] == 2
    assert _losses(tmp_path / "crash" / "contrastive") == want


def test_trained_tower_feeds_a_multimodal_lm(world, tmp_path):
    """End to end: contrastive pretraining, then an `align` stage of a MultimodalLM on that tower."""
    train_recipe(recipe_from_dict(_recipe(world, "siglip", steps=2)), tmp_path / "enc", log=lambda *a: None)
    tower_dir = tmp_path / "enc" / "contrastive" / "final" / "image_tower"
    tiny = write_tiny_world(tmp_path / "llava", n=16)
    rec = tiny_recipe(tiny, backend="torch", zero=None, steps=(2, 1))
    rec["model"]["tower"] = {"type": "clip", "path": str(tower_dir), "select_layer": -1}
    rec["stages"] = rec["stages"][:1]
    summary = train_recipe(recipe_from_dict(rec), tmp_path / "mllm", log=lambda *a: None)
    model = MultimodalLM.from_pretrained(summary["final"])
    want = build_tower(TowerConfig(type="clip", path=str(tower_dir))).model.state_dict()
    for k, v in model.tower.model.state_dict().items():  # align trains the projector only
        assert torch.equal(v, want[k]), k


@pytest.mark.parametrize("objective", ["siglip", "clip"])
def test_metrics_jsonl_logs_the_objectives_statistics(world, tmp_path, objective):
    """The objective's statistics reach metrics.jsonl under `stats`, one set per step: the logit scale
    (1/temperature), SigLIP's bias, the in-batch retrieval accuracy and (CLIP) the two directions' losses."""
    train_recipe(recipe_from_dict(_recipe(world, objective, steps=2)), tmp_path / "r", log=lambda *a: None)
    recs = [
        json.loads(ln) for ln in (tmp_path / "r" / "contrastive" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in recs] == [1, 2]
    want = (
        {"scale", "bias", "acc_i2t"}
        if objective == "siglip"
        else {"scale", "acc_i2t", "acc_t2i", "loss_i2t", "loss_t2i"}
    )
    for r in recs:
        assert set(r["stats"]) == want and all(isinstance(v, float) for v in r["stats"].values()), r
        assert all(0.0 <= r["stats"][k] <= 1.0 for k in want if k.startswith("acc_"))
    first = recs[0]["stats"]  # step 1's forward ran on the initial parameters
    if objective == "siglip":
        assert first["scale"] == pytest.approx(10.0) and first["bias"] == pytest.approx(-10.0)
    else:
        assert first["scale"] == pytest.approx(1 / 0.07, rel=1e-5)
        for r in recs:  # one micro-batch per step: the loss is the mean of the two directions
            assert r["loss"] == pytest.approx((r["stats"]["loss_i2t"] + r["stats"]["loss_t2i"]) / 2, rel=1e-5)


def test_engine_clamps_the_logit_scale_parameter_after_each_step(world, tmp_path, tokenizer):
    """The engine calls the model's after_step(): a log scale started above ln 100 is clamped to ln 100
    after the first step (open_clip's rule), where the old forward-only cap left it above, gradient 0."""
    model = _model(tokenizer)
    with torch.no_grad():
        model.heads.logit_scale.fill_(6.0)
    model.after_step()
    assert model.heads.logit_scale.item() == pytest.approx(math.log(100))
    assert model.logit_scale().item() == pytest.approx(100.0)
    rec = _recipe(world, "clip", steps=2)
    rec["model"]["encoder"]["init_log_scale"] = 6.0
    summary = train_recipe(recipe_from_dict(rec), tmp_path / "c", log=lambda *a: None)
    final = ContrastiveModel.from_pretrained(summary["final"])
    assert final.heads.logit_scale.item() <= math.log(100) + 1e-6


def test_caption_neighbours_and_negclip_hard_images(world, tokenizer):
    """NegCLIP's batch: each sample brings its nearest other sample (bag-of-words cosine of the long
    caption, identical captions passed over) with that sample's caption and one of its hard negatives;
    the model feeds them to the objective as hard_img, hard_img_txt, hard_img_hard_txt."""
    from encoders.objectives import get_objective
    from mllm.data.captions import caption_neighbours

    texts = ["a red circle", "a red circle", "a blue square", "a red square", "x"]
    assert caption_neighbours(texts) == [3, 3, 3, 0, 0]
    assert caption_neighbours(["a"]) == [0] and caption_neighbours(["a", "a", "a"]) == [1, 2, 0]
    rows = [json.loads(ln) for ln in (world / "captions.jsonl").read_text().splitlines()]
    pre = build_tower(TowerConfig(type="clip", config=TINY_TOWER)).preprocess
    ds = CaptionDataset(world / "captions.jsonl", world, pre, "long", hard_negatives=True, hard_images=True)
    assert ds.neighbours == caption_neighbours([r["long"] for r in rows])
    item = ds[0]
    j = ds.neighbours[0]
    assert j != 0 and rows[j]["long"] != rows[0]["long"] and item["hard_img_text"] == rows[j]["long"]
    assert item["hard_img_hard"] in rows[j]["negatives"].values()
    assert item["hard_pixel_values"].shape == item["pixel_values"].shape
    with pytest.raises(ValueError, match="hard_images needs hard_negatives"):
        CaptionDataset(world / "captions.jsonl", world, pre, hard_images=True)
    model = _model(tokenizer, "negclip")
    batch = CaptionCollator(model.text_tower.tokenize)([ds[i] for i in range(3)])
    assert batch["hard_pixel_values"].shape[0] == 3 and batch["hard_img_hard_input_ids"].shape[0] == 3
    with torch.no_grad():
        out = model(**batch)
        enc_t = model.encode_text
        extra = dict(
            hard_txt=enc_t(batch["hard_input_ids"], batch["hard_attention_mask"]),
            hard_img=model.encode_image(batch["hard_pixel_values"]),
            hard_img_txt=enc_t(batch["hard_img_input_ids"], batch["hard_img_attention_mask"]),
            hard_img_hard_txt=enc_t(batch["hard_img_hard_input_ids"], batch["hard_img_hard_attention_mask"]),
        )
        img = model.encode_image(batch["pixel_values"])
        txt = enc_t(batch["input_ids"], batch["attention_mask"])
        want = get_objective("negclip")(img, txt, model.logit_scale(), None, **extra)[0]
        torch.testing.assert_close(out.loss, want)
        off = _model_with(tokenizer, "negclip", {"hard_images": False})
        off.load_state_dict(model.state_dict())
        only_captions = get_objective("negclip")(
            img, txt, model.logit_scale(), None, hard_txt=extra["hard_txt"]
        )
        torch.testing.assert_close(off(**batch).loss, only_captions[0])


def _model_with(tokenizer, objective: str, args: dict) -> ContrastiveModel:
    torch.manual_seed(0)
    cfg = EncoderConfig(
        objective=objective,
        objective_args=args,
        embed_dim=16,
        text=TextTowerConfig(config=TINY_TEXT, max_length=96),
    )
    return ContrastiveModel(
        build_tower(TowerConfig(type="clip", config=TINY_TOWER, select_layer=-1)),
        build_text_tower(cfg.text, tokenizer),
        cfg,
    )


def test_negclip_stage_uses_the_worlds_negatives(world, tmp_path):
    summary = train_recipe(
        recipe_from_dict(_recipe(world, "negclip", steps=2)), tmp_path / "n", log=lambda *a: None
    )
    assert summary["stages"]["contrastive"]["steps"] == 2


# ------------------------------------------------------------------------------------------- recipes

TINY_RECIPES = ("clip-tiny", "siglip-tiny", "filip-tiny", "dcl-tiny", "negclip-tiny")


def test_tiny_recipes_differ_only_in_the_objective():
    """Equal compute: the same towers, data, batch, steps and seed; only the loss changes."""
    from mllm.config import load_recipe, to_dict

    def rest(name: str) -> tuple[str, dict]:
        tree = to_dict(load_recipe(REPO / "train/recipes" / f"{name}.yaml"))
        assert tree.pop("name") == name
        assert tree["model"]["kind"] == "contrastive" and tree["stages"][0]["kind"] == "contrastive"
        return tree["model"]["encoder"].pop("objective"), tree

    _, base = rest("clip-tiny")
    for name in TINY_RECIPES:
        objective, tree = rest(name)
        assert objective == name.split("-")[0] and tree == base, name


def test_clip_b16_recipe_builds_its_config():
    from encoders.contrastive import encoder_config
    from mllm.config import load_recipe

    recipe = load_recipe(REPO / "train/recipes/clip-b16.yaml")
    enc = encoder_config(recipe.model.encoder)
    assert recipe.model.kind == "contrastive" and enc.embed_dim == 512
    assert recipe.stages[0].zero_config == "train/ds/zero2.json" and recipe.engine.precision == "bf16"
    with torch.device("meta"):
        tower = build_tower(recipe.model.tower)
        from transformers import CLIPTextConfig, CLIPTextModel

        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, **enc.text.config))
    assert tower.grid == (14, 14) and tower.hidden_size == 768
    n = sum(p.numel() for p in tower.parameters()) + sum(p.numel() for p in text.parameters())
    assert 140e6 < n < 160e6, n  # ViT-B/16 (86M) + CLIP's text transformer (63M)
