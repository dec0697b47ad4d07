"""The bad-input corpus (tests/data/make_bad_corpus.py) through `mllm data check`, the dataset and a run.

Every bad case must be reported with its location (file, sample index and id) and its reason; the
check, a run with `skip_bad_samples: false` (stops at the first) and one with `true` (skips, counts,
lists) must use the same message for the same sample. The valid-but-unusual images (CMYK, 16-bit,
palette with transparency, EXIF-rotated, grey with alpha) must load as the RGB a viewer shows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_recipe

from mllm.chat import SampleError
from mllm.cli import main as cli_main
from mllm.config import recipe_from_dict
from mllm.data.check import check_file
from mllm.data.conversations import ConversationDataset
from mllm.data.images import load_image, resolve_image
from mllm.data.records import DataError
from mllm.model import MultimodalLM
from mllm.training.engine import TrainingError
from mllm.training.runner import train_recipe

sys.path.insert(0, str(Path(__file__).parent / "data"))
from make_bad_corpus import BOMB_SIDE, make_corpus  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    cases = make_corpus(root)
    records = json.loads((root / "records.json").read_text())
    return root, cases, records


def _records_cases(cases, kind=None):
    return [c for c in cases if c.index is not None and (kind is None or c.kind == kind)]


def test_corpus_size(corpus):
    _, cases, _ = corpus
    bad = [c for c in cases if c.kind != "valid"]
    assert len(bad) >= 25, len(bad)
    assert len({c.name for c in cases}) == len(cases)


def test_valid_unusual_images_load_as_rgb(corpus):
    root, _, _ = corpus
    im = lambda name: load_image(resolve_image(root / "images", name))  # noqa: E731
    cmyk = np.asarray(im("cmyk.jpg"))
    assert cmyk.shape == (16, 16, 3) and cmyk[..., 0].min() > 200 and cmyk[..., 1:].max() < 60  # red
    g16 = np.asarray(im("gray16.png"))
    assert g16.dtype == np.uint8 and np.all(g16 == 40000 >> 8)  # scaled to 8 bits, not clipped to white
    pal = np.asarray(im("palette_alpha.png"))
    assert pal.shape == (16, 16, 3) and tuple(pal[5, 12]) == (0, 0, 255)
    exif = im("exif_rotated.jpg")
    assert exif.size == (20, 40), "EXIF orientation 6 not applied (stored 40x20, displayed 20x40)"
    a = np.asarray(exif).astype(int)
    assert a[3, 10, 0] > 200 and a[3, 10, 1] < 60, "the red band is not on top after the rotation"
    assert a[35, 10].min() > 200, "the bottom is not white after the rotation"
    la = im("gray_alpha.png")
    assert la.mode == "RGB" and la.getpixel((0, 0)) == (120, 120, 120)


def test_data_check_reports_every_problem_with_its_location(corpus, capsys):
    root, cases, records = corpus
    code = cli_main(["data", "check", str(root / "records.json"), "--images", str(root / "images")])
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    errors = [ln for ln in out if ln.startswith("error: ")]
    for c in _records_cases(cases):
        rid = records[c.index].get("id") if isinstance(records[c.index], dict) else None
        where = f"records.json sample #{c.index}" + (f" (id {rid!r})" if rid is not None else "")
        hits = [ln for ln in out if where + ":" in ln]
        if c.kind == "valid" or c.needs_tokenizer:
            assert not hits, (c.name, hits)
        else:
            assert len(hits) == 1 and c.expect in hits[0] and hits[0].startswith(c.kind), (c.name, hits)
    n_errors = sum(c.kind == "error" and not c.needs_tokenizer for c in _records_cases(cases))
    assert len(errors) == n_errors
    assert out[-1].endswith(
        f"{n_errors} error(s), 1 warning(s) [structure, images (no --tokenizer: tokens not checked)]"
    )


@pytest.mark.parametrize(
    "case",
    [
        "json_syntax_error",
        "json_truncated",
        "non_utf8_text",
        "top_level_object",
        "empty_file",
        "trailing_comma",
        "jsonl_bad_line",
    ],
)
def test_data_check_on_unreadable_files(corpus, capsys, case):
    root, cases, _ = corpus
    c = next(c for c in cases if c.name == case)
    assert cli_main(["data", "check", str(root / c.file)]) == 1
    out = capsys.readouterr().out
    assert c.expect in out and str(root / c.file) in out, out
    with pytest.raises(DataError, match=c.expect.split(": ", 1)[-1][:20].replace("(", r"\(")):
        ConversationDataset(root / c.file, root, None, "chatml", 0, 1, None, None)


def test_data_check_clean_file_exits_zero(corpus, tmp_path, capsys):
    root, cases, records = corpus
    clean = [records[c.index] for c in _records_cases(cases, "valid")]
    (tmp_path / "clean.json").write_text(json.dumps(clean))
    assert cli_main(["data", "check", str(tmp_path / "clean.json"), "--images", str(root / "images")]) == 0
    assert (
        capsys.readouterr()
        .out.splitlines()[-1]
        .endswith(
            "7 samples, 0 error(s), 0 warning(s) [structure, images (no --tokenizer: tokens not checked)]"
        )
    )


def test_check_and_training_dataset_give_the_same_message(corpus, tiny_model, tmp_path):
    """Per case: the check's message (with a tokenizer) == the error training raises == the skip reason."""
    root, cases, records = corpus
    tok, n_img = tiny_model.tokenizer, tiny_model.num_image_tokens
    for c in _records_cases(cases):
        path = tmp_path / f"{c.name}.json"
        path.write_text(json.dumps([records[c.index]]))
        found = [
            p for p in check_file(path, root / "images", tok, "chatml", 128, n_img) if p.level == "error"
        ]
        args = (
            path,
            root / "images",
            tok,
            "chatml",
            tiny_model.image_token_id,
            n_img,
            tiny_model.tower.preprocess,
            128,
        )
        if c.kind != "error":
            assert not found, (c.name, found)
            item = ConversationDataset(*args)[0]
            assert "input_ids" in item and (item["pixel_values"] is not None) == ("image" in records[c.index])
            continue
        assert len(found) == 1 and c.expect in found[0].message, (c.name, found)
        with pytest.raises(SampleError) as e:
            ConversationDataset(*args)[0]
        assert str(e.value) == found[0].message, c.name
        assert ConversationDataset(*args, skip_bad_samples=True)[0]["skip"].reason == found[0].message


def test_bomb_is_refused_before_decoding(corpus):
    """The bomb is refused on its header: 81M pixels would take 81 MB to decode; the refusal reads ~80 KB."""
    import resource

    root, _, _ = corpus
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=f"{BOMB_SIDE}x{BOMB_SIDE}"):
        load_image(root / "images" / "bomb.png")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 40_000  # KiB: nothing near 81 MB


def _corpus_run(root: Path, records: list, tmp_path: Path, skip: bool) -> tuple[dict, Path]:
    """The corpus plus 40 good samples (so no micro-batch is all bad), as one instruct stage."""
    good = [
        {
            "id": f"good{i}",
            "image": "ok.png",
            "conversations": [{"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "red"}],
        }
        for i in range(40)
    ]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records + good))
    world = {"align": data, "instruct": data, "images": root / "images"}
    rec = tiny_recipe(world, "torch", None, steps=(1, 1))
    rec["stages"] = [
        dict(
            rec["stages"][1],
            max_steps=None,
            epochs=1,
            grad_accum=1,
            data={"json": str(data), "images": str(root / "images"), "skip_bad_samples": skip},
        )
    ]
    return rec, data


def test_training_skips_lists_and_stops_with_the_check_messages(corpus, tmp_path):
    root, cases, records = corpus
    rec, data = _corpus_run(root, records, tmp_path, skip=True)
    lines: list[str] = []
    summary = train_recipe(
        recipe_from_dict(rec), tmp_path / "run", log=lambda *a: lines.append(" ".join(map(str, a)))
    )
    skipped = [s["reason"] for s in summary["stages"]["instruct"]["skipped"]]
    model = MultimodalLM.from_pretrained(summary["final"])
    want = [
        p.message
        for p in check_file(
            data, root / "images", model.tokenizer, "chatml", model.meta.max_length, model.num_image_tokens
        )
        if p.level == "error"
    ]
    n_bad = sum(c.kind == "error" for c in _records_cases(cases))
    assert len(want) == n_bad
    assert sorted(skipped) == sorted(want)
    assert any(f"skipped {n_bad} bad sample(s)" in ln for ln in lines)
    assert all(any(w in ln for ln in lines) for w in want)  # each listed at the end of the run

    rec["stages"][0]["data"]["skip_bad_samples"] = False
    with pytest.raises((SampleError, TrainingError)) as e:
        train_recipe(recipe_from_dict(rec), tmp_path / "run-strict", log=lambda *a: None)
    assert str(e.value) in want, str(e.value)
