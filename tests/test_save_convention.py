"""One save convention: every saved folder has one meta file with its `kind` and `format_version`
(encoders.common.write_meta / read_meta), checked on load; folders saved before it still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from encoders.common import FormatError, meta_kind, read_meta, write_meta
from encoders.geo import GeoConfig, GeoEncoder
from mllm.model import MultimodalLM


def _edit(path: Path, **changes) -> None:
    """Rewrite a meta file: a value of None drops the key (an old-style file)."""
    meta = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    path.write_text(json.dumps(meta))


def test_helper_writes_kind_and_version_and_checks_them(tmp_path):
    p = tmp_path / "m.json"
    written = write_meta(p, "thing", 2, {"a": 1, "kind": "ignored", "format_version": 9})
    assert written == {"kind": "thing", "format_version": 2, "a": 1} == json.loads(p.read_text())
    assert read_meta(p, "thing", 2)["a"] == 1 and meta_kind(p) == "thing"
    assert read_meta(p, {"other": 5, "thing": 3})["kind"] == "thing"
    with pytest.raises(
        FormatError,
        match=r"m.json: 'thing' format_version 2 is newer than this code reads "
        r"\(up to 1\); upgrade mllm",
    ):
        read_meta(p, "thing", 1)
    with pytest.raises(
        FormatError,
        match=r"m.json: this folder holds a saved 'thing', not 'other'; load it "
        r"with the loader of kind 'thing'",
    ):
        read_meta(p, "other", 1)
    _edit(p, format_version="1")
    with pytest.raises(FormatError, match="format_version must be a non-negative integer"):
        read_meta(p, "thing", 1)
    # written before the convention: no kind, no version -> version 0 of the kind the loader expects
    p.write_text(json.dumps({"a": 1}))
    assert read_meta(p, "thing", 1) == {"a": 1, "kind": "thing", "format_version": 0}
    assert meta_kind(p) is None and meta_kind(p, "thing") == "thing"
    with pytest.raises(FileNotFoundError, match="not a saved 'thing' folder"):
        read_meta(tmp_path / "none.json", "thing", 1)


def test_mllm_folder(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "mllm.json").read_text())
    assert (meta["kind"], meta["format_version"]) == ("mllm", 1)
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "m", old)
    _edit(old / "mllm.json", kind=None, format_version=None)  # an mllm.json from before versions
    back = MultimodalLM.from_pretrained(old)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in tiny_model.state_dict().items())
    _edit(old / "mllm.json", format_version=2)
    with pytest.raises(FormatError, match="mllm.json: 'mllm' format_version 2 is newer"):
        MultimodalLM.from_pretrained(old)
    _edit(old / "mllm.json", format_version=1, kind="contrastive")
    with pytest.raises(FormatError, match="holds a saved 'contrastive', not 'mllm'"):
        MultimodalLM.from_pretrained(old)


def test_geo_folder(tmp_path):
    cfg = GeoConfig(image_size=32, channels=[8, 8, 16, 16], fpn_dim=16, attn_heads=2)
    geo = GeoEncoder(cfg)
    geo.save_pretrained(tmp_path / "g")
    assert meta_kind(tmp_path / "g" / "geo_config.json") == "geo"
    # the old file was the bare GeoConfig
    _edit(tmp_path / "g" / "geo_config.json", kind=None, format_version=None)
    assert GeoEncoder.from_pretrained(tmp_path / "g").config == cfg
    assert GeoEncoder.read_config(tmp_path / "g") == cfg
    _edit(tmp_path / "g" / "geo_config.json", format_version=7)
    with pytest.raises(FormatError, match="'geo' format_version 7 is newer"):
        GeoEncoder.from_pretrained(tmp_path / "g")


def test_cache_and_checkpoint_meta_are_checked(tmp_path):
    from mllm import prior as P

    fp = {"version": 1, "alpha": 1.0}
    P.save_cache(tmp_path / "c", {"a": torch.ones(2)}, fp)
    assert meta_kind(tmp_path / "c" / "manifest.json") == "prior_cache"
    P.check_fingerprint(tmp_path / "c", fp)
    _edit(tmp_path / "c" / "manifest.json", kind=None, format_version=None)  # a cache from before
    P.check_fingerprint(tmp_path / "c", fp)
    _edit(tmp_path / "c" / "manifest.json", format_version=2)
    with pytest.raises(FormatError, match="'prior_cache' format_version 2 is newer"):
        P.check_fingerprint(tmp_path / "c", fp)
    _edit(tmp_path / "c" / "manifest.json", format_version=1, kind="feature_cache")
    with pytest.raises(FormatError, match="holds a saved 'feature_cache', not 'prior_cache'"):
        P.WeightCache(tmp_path / "c", fp)
