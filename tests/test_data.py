"""Bad input: each gets an error naming the file and sample, or a counted, listed skip."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_recipe, write_tiny_world
from PIL import Image

from mllm.chat import SampleError
from mllm.config import recipe_from_dict
from mllm.data.conversations import Collator, ConversationDataset, DataError, read_records
from mllm.data.images import ImageError, resolve_image
from mllm.training.runner import train_recipe


def _ds(tiny_model, path, root, skip=False, max_length=128):
    return ConversationDataset(
        path,
        root,
        tiny_model.tokenizer,
        "chatml",
        tiny_model.image_token_id,
        tiny_model.num_image_tokens,
        tiny_model.tower.preprocess,
        max_length,
        skip,
    )


def _sample(i, image="img.png", q="<image>\nWhat color?", a="red"):
    conv = [{"from": "human", "value": q}]
    if a is not None:
        conv.append({"from": "gpt", "value": a})
    rec = {"id": f"s{i}", "conversations": conv}
    if image is not None:
        rec["image"] = image
    return rec


BAD = {
    "missing image": (_sample(0, image="nope.png"), "image file not found"),
    "unreadable image": (_sample(0, image="broken.png"), "cannot decode image"),
    "no assistant turn": (_sample(0, a=None), "no assistant turn"),
    "more <image> than images": (_sample(0, q="<image>\n<image>\nWhat?"), "2 <image> marker(s)"),
    "too long": (_sample(0, a="red " * 200), "exceed max_length"),
    "escaping path": (_sample(0, image="../../etc/passwd"), "escapes the image root"),
    "unknown role": ({"id": "s0", "conversations": [{"from": "robot", "value": "x"}]}, "unknown role"),
}


@pytest.fixture()
def root(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "img.png")
    (tmp_path / "broken.png").write_bytes(Image.new("RGB", (32, 32)).tobytes()[:50])
    return tmp_path


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sample_error_names_file_and_sample(tiny_model, root, case):
    rec, msg = BAD[case]
    path = root / "data.json"
    path.write_text(json.dumps([_sample(9), rec]))
    with pytest.raises(SampleError) as e:
        ds = _ds(tiny_model, path, root)
        for i in range(len(ds)):
            ds[i]
    text = str(e.value)
    assert str(path) in text and "sample #1" in text and "'s0'" in text and msg in text, text


def test_json_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n  {"id": "a",\n   "conversations": [}\n]')
    with pytest.raises(DataError, match=r"bad.json:3: JSON syntax error"):
        read_records(p)
    q = tmp_path / "bad.jsonl"
    q.write_text('{"id": 1}\n{"id": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: JSON syntax error"):
        read_records(q)


def test_path_confinement():
    with pytest.raises(ImageError):
        resolve_image("/data/images", "/etc/passwd")
    assert str(resolve_image("/data/images", "a/b.png")) == "/data/images/a/b.png"


def test_skip_bad_samples_counts_and_lists(tiny_model, root):
    path = root / "data.json"
    recs = [_sample(0), BAD["missing image"][0], _sample(2), BAD["no assistant turn"][0], _sample(4)]
    recs[3]["id"] = "s3"
    path.write_text(json.dumps(recs))
    ds = _ds(tiny_model, path, root, skip=True)
    batch = Collator(tiny_model.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    assert batch["input_ids"].shape[0] == 3
    assert [s.sample.split("(id ")[1] for s in batch["skips"]] == ["'s0')", "'s3')"]
    assert "image file not found" in batch["skips"][0].reason


def test_training_with_skips_lists_them_in_the_run_summary(tmp_path):
    world = write_tiny_world(tmp_path / "w", n=16)
    recs = json.loads(world["instruct"].read_text())
    recs[3]["image"] = "images/missing.png"
    world["instruct"].write_text(json.dumps(recs))
    rec = tiny_recipe(world, "torch", None, steps=(1, 4))
    rec["stages"][1]["data"]["skip_bad_samples"] = True
    summary = train_recipe(recipe_from_dict(rec), tmp_path / "run", log=lambda *a: None)
    skipped = summary["stages"]["instruct"]["skipped"]
    assert skipped and all("images/missing.png" in s["reason"] for s in skipped)
    # Without the flag, the same data stops the run with the same message.
    rec["stages"][1]["data"]["skip_bad_samples"] = False
    with pytest.raises(SampleError, match="missing.png"):
        train_recipe(recipe_from_dict(rec), tmp_path / "run2", log=lambda *a: None)
