"""The projection-head study (encoders.projection_head, mllm.evaluation.projection_probe): each space returns
the tensor it names (the head's input and what a MultimodalLM reads before the head; the contrastive
embedding after it), and the probe prints one row per space."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TOWER

from encoders.contrastive import ContrastiveModel, EncoderConfig
from encoders.projection_head import image_features
from encoders.text_tower import TextTowerConfig, build_text_tower
from encoders.towers import TowerConfig, build_tower
from mllm.data.geoworld import write_world
from mllm.evaluation.projection_probe import projection_probe

REPO = Path(__file__).resolve().parents[1]
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=96,
)
EMBED = 16  # != the tower's 32, so the two spaces cannot be confused by shape


def _model(tokenizer, pool: str = "pooler") -> ContrastiveModel:
    torch.manual_seed(0)
    cfg = EncoderConfig(
        embed_dim=EMBED, image_pool=pool, text=TextTowerConfig(config=TINY_TEXT, max_length=96)
    )
    return ContrastiveModel(
        build_tower(TowerConfig(type="clip", config=TINY_TOWER, select_layer=-1)),
        build_text_tower(cfg.text, tokenizer),
        cfg,
    ).eval()


@pytest.mark.parametrize("pool", ["pooler", "mean"])
def test_each_space_is_the_tensor_it_names(tokenizer, pool):
    model = _model(tokenizer, pool)
    pv = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        post = image_features(model, pv, "post")
        post_tok = image_features(model, pv, "post", tokens=True)
        pre = image_features(model, pv, "pre")
        pre_tok = image_features(model, pv, "pre", tokens=True)
        emb, emb_tok = model.encode_image(pv, tokens=True)
        hidden, pooler = model.image_tower.final_outputs(pv)
    assert post.shape == (3, EMBED) and post_tok.shape == (3, 16, EMBED)
    assert pre.shape == (3, 32) and pre_tok.shape == (3, 16, 32)
    assert torch.equal(post, emb) and torch.equal(post_tok, emb_tok)
    # "pre" pooled is the projection head's input: the head maps it onto the embedding
    assert torch.allclose(F.normalize(model.heads.image_proj(pre), dim=-1), post, atol=1e-6)
    want = hidden[:, 1:].mean(1) if pool == "mean" else pooler
    assert torch.equal(pre, want)
    # at select_layer -1 the tokens before the head are the ones the head projects per patch
    assert torch.allclose(F.normalize(model.heads.image_proj(pre_tok), dim=-1), post_tok, atol=1e-6)
    with pytest.raises(ValueError, match="space"):
        image_features(model, pv, "projected")


def test_pre_tokens_are_what_a_multimodal_lm_reads_from_the_saved_tower(tokenizer, tmp_path):
    model = _model(tokenizer)
    model.save_pretrained(tmp_path / "pair")
    mllm_tower = build_tower(
        TowerConfig(type="clip", path=str(tmp_path / "pair" / "image_tower"), select_layer=-1)
    )
    pv = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(image_features(model, pv, "pre", tokens=True), mllm_tower(pv).tokens, atol=1e-6)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("geoworld")
    write_world(
        out,
        seed=3,
        n=24,
        size=48,  # the tower preprocesses it to 32 px
        n_eval=8,
        mmvp_pairs=2,
        pope_questions=2,
        refcoco_n=2,
        mathverse_problems=1,
        mmvp_vlm_pairs=2,
    )
    return out


def test_the_probe_reports_one_row_per_space(tokenizer, world):
    rows = projection_probe(_model(tokenizer), world, train_limit=24, steps=20)
    assert [r["space"] for r in rows] == ["pre", "post"]
    assert [r["dim"] for r in rows] == [32, EMBED]
    for r in rows:
        assert r["test_patches"] > 0
        assert all(0.0 <= r[k] <= 1.0 for k in ("colour_acc", "colour_fg_acc", "shape_acc", "shape_fg_acc"))


def test_the_script_prints_both_rows(tokenizer, world, tmp_path):
    _model(tokenizer).save_pretrained(tmp_path / "pair")
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "probe_projection.py"), str(tmp_path / "pair"), str(world)]
        + ["--train-limit", "24", "--steps", "10"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env={"OMP_NUM_THREADS": "1", "PATH": "", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["space", "dim"]
    assert [ln.split()[0] for ln in lines[1:]] == ["pre", "post"]
