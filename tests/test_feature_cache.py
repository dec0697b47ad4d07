"""Frozen-tower feature cache: same loss as the tower itself, reuse, and refusal of a stale cache."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_recipe, write_tiny_world
from PIL import Image

from mllm.chat import SampleError
from mllm.config import recipe_from_dict
from mllm.data.conversations import Collator, ConversationDataset
from mllm.feature_cache import (
    FeatureCache,
    StaleCacheError,
    build_cache,
    check_frozen,
    dataset_images,
    file_hash,
    tower_fingerprint,
)
from mllm.tokenizer import ensure_image_token
from mllm.training.runner import train_recipe


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_tiny_world(tmp_path_factory.mktemp("fc-world"), n=12)


def _dataset(model, world, key="align"):
    return ConversationDataset(
        world[key],
        world["images"],
        model.tokenizer,
        "chatml",
        model.image_token_id,
        model.num_image_tokens,
        model.preprocess,
        128,
    )


def _inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("skips", "ids")}


@pytest.fixture()
def model(tiny_model, tokenizer):
    ensure_image_token(tokenizer, "<image>")
    return tiny_model.eval()


def test_cached_features_give_the_towers_loss(model, world, tmp_path):
    ds = _dataset(model, world)
    logs = []
    cache = build_cache(model, dataset_images(ds), tmp_path / "fc", log=logs.append)
    # keyed by content: identical files (same colour and shape) share one entry
    assert len(cache) == len({file_hash(p) for p in dataset_images(ds)}) < len(ds)
    assert any("to encode" in m for m in logs)
    shards = list((tmp_path / "fc").glob("shard-*.safetensors"))
    assert (
        shards
        and json.loads((tmp_path / "fc" / "manifest.json").read_text())["fingerprint"]["dtype"] == "float16"
    )

    plain = Collator(model.tokenizer.pad_token_id)([ds[i] for i in range(8)])
    ds.features = cache
    items = [ds[i] for i in range(8)]
    assert all(it["pixel_values"] is None and it["image_features"].dtype == torch.float16 for it in items)
    cached = Collator(model.tokenizer.pad_token_id)(items)
    assert "image_features" in cached and cached["pixel_values"] is None
    with torch.no_grad():
        want = model(**_inputs(plain)).loss
        got = model(**_inputs(cached)).loss
        # the features themselves: fp16 rounding of the tower's fp32 output, nothing else
        feats = model.tower_features(plain["pixel_values"])
    assert torch.allclose(cached["image_features"].float(), feats, rtol=1e-3, atol=1e-3)
    assert abs(float(got) - float(want)) < 1e-3 * max(1.0, abs(float(want)))
    # packed + cached together
    packed = Collator(model.tokenizer.pad_token_id, pack_length=128)(items)
    with torch.no_grad():
        assert torch.allclose(model(**_inputs(packed)).loss, got, atol=1e-5)

    # a second build over the same images encodes nothing and adds no shard
    logs.clear()
    build_cache(model, dataset_images(ds), tmp_path / "fc", log=logs.append)
    assert not logs and sorted((tmp_path / "fc").glob("shard-*.safetensors")) == sorted(shards)


def test_changed_image_is_a_miss_then_an_increment(model, world, tmp_path):
    import shutil

    root = tmp_path / "w"
    shutil.copytree(world["images"], root, dirs_exist_ok=True)
    shutil.copy(world["align"], root / "align.json")
    w = {"align": root / "align.json", "images": root}
    ds = _dataset(model, w)
    cache = build_cache(model, dataset_images(ds), tmp_path / "fc")
    ds.features = cache
    rel = json.loads((root / "align.json").read_text())[0]["image"]
    Image.new("RGB", (32, 32), "black").save(root / rel)  # the file changes after caching
    with pytest.raises(SampleError, match=r"sample #0 .*not in the feature cache"):
        ds[0]
    logs = []
    ds.features = build_cache(model, dataset_images(ds), tmp_path / "fc", log=logs.append)
    assert any("1 image(s) to encode" in m for m in logs)
    assert len(list((tmp_path / "fc").glob("shard-*.safetensors"))) == 2
    assert ds[0]["image_features"].shape[0] == 1


def test_stale_cache_is_refused_with_the_reason(model, world, tmp_path):
    ds = _dataset(model, world)
    build_cache(model, dataset_images(ds), tmp_path / "fc")
    fp = tower_fingerprint(model)
    FeatureCache(tmp_path / "fc", fp)  # same tower: accepted
    with torch.no_grad():
        next(model.tower.parameters()).add_(0.01)
    with pytest.raises(StaleCacheError, match="tower weights changed"):
        build_cache(model, dataset_images(ds), tmp_path / "fc")
    with pytest.raises(StaleCacheError, match="tower weights changed"):
        FeatureCache(tmp_path / "fc", tower_fingerprint(model))
    with pytest.raises(StaleCacheError, match=r"dtype changed \(cache 'float16', now 'bfloat16'\)"):
        FeatureCache(tmp_path / "fc", {**fp, "dtype": "bfloat16"})
    model.tower.config.select_layer = -2
    with pytest.raises(StaleCacheError, match=r"select_layer changed \(cache -1, now -2\)"):
        FeatureCache(tmp_path / "fc", {**tower_fingerprint(model), "tower weights": fp["tower weights"]})


def test_refused_when_the_stage_trains_the_tower():
    check_frozen({"projector": 1e-3}, "align")
    with pytest.raises(ValueError, match="needs a frozen tower.*'tower'"):
        check_frozen({"projector": 1e-3, "tower": 1e-4}, "instruct")


def test_recipe_switch_trains_the_same_with_the_cache(tmp_path):
    """`data.feature_cache: true` on an align stage: the cache is built beside the data, and the
    loss sequence matches the uncached run to fp16 rounding."""
    world = write_tiny_world(tmp_path / "world", n=16)
    runs = {}
    for name, on in (("plain", False), ("cached", True)):
        tree = tiny_recipe(world, backend="torch", zero=None, steps=(4, 0))
        tree["stages"] = tree["stages"][:1]
        tree["stages"][0]["data"]["feature_cache"] = on
        tree["stages"][0]["data"]["packing"] = on  # and packing, which must not change the loss either
        summary = train_recipe(recipe_from_dict(tree), tmp_path / name, log=lambda *_: None)
        assert summary["stages"]["align"]["steps"] == 4
        runs[name] = [
            json.loads(x)["loss"]
            for x in (tmp_path / name / "align" / "metrics.jsonl").read_text().splitlines()
        ]
    caches = list((tmp_path / "world" / "feature_cache").glob("*/manifest.json"))
    assert len(caches) == 1
    distinct = {file_hash(p) for p in (tmp_path / "world" / "images").glob("*.png")}
    assert json.loads(caches[0].read_text())["images"] == len(distinct)
    for a, b in zip(runs["plain"], runs["cached"]):
        assert abs(a - b) < 2e-3 * max(1.0, abs(a)), (runs["plain"], runs["cached"])
