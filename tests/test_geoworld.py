"""GeoWorld: determinism, file layouts, and answers recomputed from the scene graphs.

The checks re-derive answers with their own small phrase resolver (not GeoWorld's), so a
question that is ambiguous, or an answer that disagrees with the picture's scene graph, fails.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mllm.data.geoworld import (
    iter_text,
    qa_pool,
    refer,
    render,
    sample_scene,
    scene_from_dict,
    write_held_out_at,
    write_world,
)
from mllm.data.geoworld.sampling import fresh, pixel_key, stream
from mllm.data.geoworld.vocab import COLORS, SHAPES

SMALL = dict(n=120, size=64, n_eval=80, mmvp_pairs=16, pope_questions=60, refcoco_n=30, mathverse_problems=10)
REGION_PHRASES = {
    "at the top left": "top left",
    "at the top right": "top right",
    "at the bottom left": "bottom left",
    "at the bottom right": "bottom right",
    "at the top": "top",
    "at the bottom": "bottom",
    "on the left": "left",
    "on the right": "right",
    "in the center": "center",
}
CATEGORIES = {"colour", "shape", "count", "position", "orientation", "size", "existence", "math"}
MV_FIELDS = [
    "sample_index",
    "problem_index",
    "problem_version",
    "question",
    "image",
    "answer",
    "question_type",
    "metadata",
    "query_wo",
    "query_cot",
]
VERSIONS = ["Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only"]


# ---------------------------------------------------------------------------------------------- helpers


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def region_of(x: int, y: int, w: int, h: int) -> str:
    col = "left" if x < w / 3 else ("right" if x >= 2 * w / 3 else "center")
    row = "top" if y < h / 3 else ("bottom" if y >= 2 * h / 3 else "middle")
    return col if row == "middle" else (row if col == "center" else f"{row} {col}")


def resolve(scene: dict, phrase: str) -> list[int]:
    """Indices of the shapes a phrase like "the small red circle on the left" describes."""
    assert phrase.startswith("the "), phrase
    rest, region = phrase[4:], None
    for words, reg in REGION_PHRASES.items():
        if rest.endswith(" " + words):
            rest, region = rest[: -len(words) - 1], reg
            break
    *adjs, noun = rest.split()
    out = []
    for i, s in enumerate(scene["shapes"]):
        if noun != "object" and s["kind"] != noun:
            continue
        if any(a != s["size"] and a != s["color"] for a in adjs):
            continue
        if region and not set(region.split()) <= set(s["region"].split()):
            continue
        out.append(i)
    return out


def one(scene: dict, phrase: str) -> dict:
    hits = resolve(scene, phrase)
    assert len(hits) == 1, f"{phrase!r} is ambiguous or empty ({hits}) in {scene['shapes']}"
    return scene["shapes"][hits[0]]


def expected_answer(scene: dict, q: str) -> str | None:
    """Recompute the canonical answer of a GeoWorld question from the scene graph (None: unknown form)."""
    shapes, w, h = scene["shapes"], scene["width"], scene["height"]
    if scene.get("figure"):
        fig = scene["figure"]
        if q == "What shape is shown in the figure?":
            return "triangle"
        if q.endswith(fig["question"]):
            return fig["answer"]
        m = re.fullmatch(r"What is the measure of angle (\w) in degrees\?|What is the length of (\w\w)\?", q)
        key = f"angle:{m.group(1)}" if m and m.group(1) else f"side:{m.group(2)}" if m else None
        cond = next(c for c in fig["conditions"] if c["key"] == key)
        assert key in fig["drawn"]
        return str(cond["value"])
    if m := re.fullmatch(r"What color is (the .+)\?", q):
        return one(scene, m.group(1))["color"]
    if m := re.fullmatch(r"What shape is (the .+)\?", q):
        return one(scene, m.group(1))["kind"]
    if m := re.fullmatch(r"Is (the .+) small or large\?", q):
        return one(scene, m.group(1))["size"]
    if m := re.fullmatch(r"Which way is (the .+) pointing\?|Is (the .+) horizontal or vertical\?", q):
        return one(scene, m.group(1) or m.group(2))["orientation"]
    if m := re.fullmatch(r"Is (the .+) to the left of (the .+)\?", q):
        return "yes" if one(scene, m.group(1))["x"] < one(scene, m.group(2))["x"] else "no"
    if m := re.fullmatch(r"Is (the .+) above (the .+)\?", q):
        return "yes" if one(scene, m.group(1))["y"] < one(scene, m.group(2))["y"] else "no"
    if m := re.fullmatch(r"Is (the .+) on the left or the right\?", q):
        return "left" if one(scene, m.group(1))["x"] < w / 2 else "right"
    if m := re.fullmatch(r"Is (the .+) at the top or the bottom\?", q):
        return "top" if one(scene, m.group(1))["y"] < h / 2 else "bottom"
    if q == "How many shapes are there?":
        return str(len(shapes))
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", q):
        return str(sum(s["color"] == m.group(1) for s in shapes))
    if m := re.fullmatch(r"How many (\w+)s are there\?", q):
        return str(sum(s["kind"] == m.group(1) for s in shapes))
    if m := re.fullmatch(r"Is there an? (.+) in the image\?", q):
        words = m.group(1).split()
        present = any(s["kind"] == words[-1] and (len(words) == 1 or s["color"] == words[0]) for s in shapes)
        return "yes" if present else "no"
    return None


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gw") / "world"
    return out, write_world(out, seed=7, **SMALL)


@pytest.fixture(scope="module")
def train_scenes(world) -> dict[str, dict]:
    out, _ = world
    return {r["id"]: r["scene"] for r in jsonl(out / "scenes.jsonl")}


# ------------------------------------------------------------------------------------------- determinism


def test_same_seed_byte_identical_and_different_seed_differs(tmp_path):
    kw = dict(SMALL, n=40, n_eval=16, mmvp_pairs=8, refcoco_n=8, mathverse_problems=5)
    write_world(tmp_path / "a", seed=3, **kw)
    write_world(tmp_path / "b", seed=3, **kw)
    write_world(tmp_path / "c", seed=4, **kw)
    ha, hb, hc = (file_hashes(tmp_path / x) for x in "abc")
    assert ha == hb
    assert ha.keys() == hc.keys()
    changed = [k for k in ha if ha[k] != hc[k]]
    assert "scenes.jsonl" in changed and "mathverse/testmini.json" in changed
    assert len(changed) > 0.8 * len(ha)
    # rewriting in place replaces the old world cleanly
    write_world(tmp_path / "a", seed=3, **dict(kw, n=20))
    assert len(list((tmp_path / "a" / "images").iterdir())) == 20


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(FileExistsError):
        write_world(tmp_path, seed=0, n=4)


# -------------------------------------------------------------------------------------------- layouts


def test_manifest_and_every_file_parses(world):
    out, manifest = world
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["version"] == 1 and manifest["seed"] == 7 and manifest["n"] == 120
    c = manifest["counts"]
    for p in out.rglob("*"):
        if p.suffix == ".jsonl" or p.name.startswith("geoworld_pope_"):
            rows = jsonl(p)
            key = str(p.relative_to(out))
            if key in c:
                assert len(rows) == c[key], key
        elif p.suffix == ".json":
            json.loads(p.read_text(encoding="utf-8"))
    assert len(list((out / "images").glob("*.png"))) == c["images"] == 120
    assert len(list((out / "eval" / "images").glob("*.png"))) == c["eval/images"] == 80
    assert len(list((out / "mmvp" / "MMVP Images").glob("*.jpg"))) == c["mmvp/MMVP Images"] == 32
    assert len(list((out / "pope" / "images").glob("*.png"))) == c["pope/images"] == 10
    assert len(list((out / "mathverse" / "images").glob("*.png"))) == c["mathverse/images"] == 40
    assert len(json.loads((out / "align.json").read_text())) == c["align.json"]


def test_referenced_images_exist_at_declared_size(world):
    out, _ = world
    refs: list[tuple[Path, tuple[int, int]]] = []
    for name in ("align.json", "instruct.json"):
        refs += [(out / r["image"], (64, 64)) for r in json.loads((out / name).read_text())]
    for name in ("captions.jsonl", "scenes.jsonl", "eval/qa.jsonl"):
        refs += [(out / r["image"], (64, 64)) for r in jsonl(out / name)]
    refs += [(out / r["image"], (r["width"], r["height"])) for r in jsonl(out / "regions.jsonl")]
    refs += [
        (out / "refcoco/images" / r["image"], (r["width"], r["height"]))
        for r in jsonl(out / "refcoco/refcoco_val.jsonl")
    ]
    for split in ("random", "popular", "adversarial"):
        refs += [
            (out / "pope/images" / r["image"], (64, 64))
            for r in jsonl(out / f"pope/geoworld_pope_{split}.json")
        ]
    sizes = {
        r["image"]: (r["scene"]["width"], r["scene"]["height"]) for r in jsonl(out / "mathverse/scenes.jsonl")
    }
    refs += [
        (out / "mathverse/images" / e["image"], sizes[e["image"]])
        for e in json.loads((out / "mathverse/testmini.json").read_text())
    ]
    assert len(dict(refs)) == len(set(refs)), "one image referenced with two sizes"
    for path, size in dict(refs).items():
        with Image.open(path) as im:
            im.load()
            assert im.size == size, path


def test_llava_layouts(world):
    out, _ = world
    for name, turns in (("align.json", (1, 1)), ("instruct.json", (2, 4))):
        for item in json.loads((out / name).read_text()):
            assert set(item) == {"id", "image", "conversations"}
            conv = item["conversations"]
            assert turns[0] <= len(conv) // 2 <= turns[1] and len(conv) % 2 == 0
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert sum(t["value"].count("<image>") for t in conv) == 1
            assert conv[0]["value"].count("<image>") == 1
            if name == "align.json":
                assert conv[0]["value"].endswith("\n<image>")
            else:
                assert conv[0]["value"].startswith("<image>\n")
            for t in conv[1::2]:
                assert t["value"] == t["value"].strip() and "<image>" not in t["value"]


def test_captions(world, train_scenes):
    out, _ = world
    for row in jsonl(out / "captions.jsonl"):
        scene = train_scenes[row["id"]]
        assert row["short"] and row["long"].endswith(".")
        if scene["figure"] is None:
            for s in scene["shapes"]:
                assert f"{s['color']} " in row["long"] and s["kind"] in row["long"]
            assert row["long"].count(", ") + row["long"].count(" and ") >= len(scene["shapes"]) - 1


# -------------------------------------------------------------------------------------- answers vs scenes


def test_align_caption_frames_the_exact_caption(world, train_scenes):
    """PRIOR's setting: the alignment caption is the exact long caption (image-only content) inside
    framing that a text-only model predicts, and it says the true number of shapes."""
    out, _ = world
    longs = {r["id"]: r["long"] for r in jsonl(out / "captions.jsonl")}
    framed = 0
    for item in json.loads((out / "align.json").read_text()):
        caption = item["conversations"][1]["value"]
        body = longs[item["id"]].rstrip(".")
        assert body[:1].lower() + body[1:] in caption
        scene = train_scenes[item["id"]]
        if scene["figure"] is None:
            n = len(scene["shapes"])
            assert (
                "one shape" if n == 1 else f"{['two', 'three', 'four', 'five', 'six'][n - 2]} shapes"
            ) in caption
        framed += len(caption) > len(body) + 20
    assert framed == len(longs)


def test_instruct_answers_agree_with_scene_graph(world, train_scenes):
    out, _ = world
    seen_cats = set()
    for item in json.loads((out / "instruct.json").read_text()):
        scene = train_scenes[item["id"]]
        conv = item["conversations"]
        for human, gpt in zip(conv[::2], conv[1::2]):
            q = human["value"].removeprefix("<image>\n")
            answer = gpt["value"]
            mc = re.fullmatch(r"(.*\?) \(a\) (\S+) \(b\) (\S+)", q)
            if mc:  # MMVP-style turn: the letter must name the true answer, the other option must not
                q, opts = mc.group(1), {"(a)": mc.group(2), "(b)": mc.group(3)}
                assert answer in opts and opts["(a)"] != opts["(b)"], (q, answer)
                answer = opts[answer]
                seen_cats.add("MC")
            expected = expected_answer(scene, q)
            assert expected is not None, f"unrecognised question {q!r}"
            assert answer == expected, (q, scene)
            assert gpt["value"] == gpt["value"].lower() and not gpt["value"].endswith(".")
            seen_cats.add(q.split()[0])
    assert {"What", "How", "Is", "MC"} <= seen_cats


def test_eval_split_balanced_and_correct(world):
    out, manifest = world
    rows = jsonl(out / "eval" / "qa.jsonl")
    scenes = {r["id"]: r["scene"] for r in jsonl(out / "eval" / "scenes.jsonl")}
    counts = {c: sum(r["category"] == c for r in rows) for c in CATEGORIES}
    assert set(counts.values()) == {10} and manifest["eval_categories"] == counts
    for r in rows:
        assert set(r) == {"id", "image", "question", "answer", "category"}
        assert r["image"].startswith("eval/images/")
        assert expected_answer(scenes[r["id"]], r["question"]) == r["answer"], r


def test_default_eval_size_has_40_per_category():
    from mllm.data.geoworld.heldout import default_n_eval

    assert default_n_eval(2000) == 400 and default_n_eval(2000) // len(CATEGORIES) >= 40


def test_boxes_tight_around_drawn_pixels(world, train_scenes):
    out, _ = world
    for row in jsonl(out / "regions.jsonl"):
        scene = train_scenes[row["id"]]
        img = np.asarray(Image.open(out / row["image"]).convert("RGB")).astype(int)
        h, w, _ = img.shape
        yy, xx = np.mgrid[0:h, 0:w]
        for r in row["regions"]:
            x1, y1, x2, y2 = r["box"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            assert (img[y1:y2, x1:x2] != 255).any(), "box holds no drawn pixel"
        if scene["figure"] is not None:
            continue
        assert len(row["regions"]) == len(scene["shapes"])
        for r in row["regions"]:
            s = one(scene, r["phrase"])
            assert r["box"] == s["box"]
            near = (xx - s["x"]) ** 2 + (yy - s["y"]) ** 2 <= (s["radius"] + 1.5) ** 2
            mine = near & (img == np.array(COLORS[s["color"]])).all(-1)
            ys, xs = np.nonzero(mine)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == s["box"], (r, s)


# ----------------------------------------------------------------------------------------------- MMVP


def _mmvp_answer(scene: dict, pattern: str, q: str) -> str:
    shapes, w = scene["shapes"], scene["width"]

    def kind(k: str) -> dict:
        hits = [s for s in shapes if s["kind"] == k]
        assert len(hits) == 1, (q, shapes)
        return hits[0]

    if m := re.fullmatch(r"Which direction is the (\w+) pointing\?|Is the (\w+) horizontal or vertical\?", q):
        return kind(m.group(1) or m.group(2))["orientation"]
    if m := re.fullmatch(r"How many (\w+)s are there\?", q):
        return str(sum(s["kind"] == m.group(1) for s in shapes))
    if m := re.fullmatch(r"What color is the (\w+)\?", q):
        return kind(m.group(1))["color"]
    if m := re.fullmatch(r"Is the (\w+) on the left or the right side of the image\?", q):
        return "left" if kind(m.group(1))["x"] < w / 2 else "right"
    if m := re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", q):
        return "yes" if any(s["color"] == m.group(1) and s["kind"] == m.group(2) for s in shapes) else "no"
    if m := re.fullmatch(r"Is the (\w+) small or large\?", q):
        return kind(m.group(1))["size"]
    if m := re.fullmatch(r"Is the (\w+) to the left or to the right of the (\w+)\?", q):
        return "left" if kind(m.group(1))["x"] < kind(m.group(2))["x"] else "right"
    if m := re.fullmatch(r"What shape is the (\w+) object\?", q):
        hits = [s for s in shapes if s["color"] == m.group(1)]
        assert len(hits) == 1
        return hits[0]["kind"]
    raise AssertionError(f"unknown MMVP question {q!r} ({pattern})")


_MMVP_FIELDS = {
    "orientation": {"angle", "orientation", "box"},
    "color": {"color"},
    "size": {"size", "radius", "box"},
    "position": {"x", "y", "region", "box"},
    "relative_position": {"x", "y", "region", "box"},
    "shape": {"kind", "box"},
}


def _check_single_difference(a: list[dict], b: list[dict], pattern: str) -> None:
    if pattern in ("count", "presence"):
        long_, short = (a, b) if len(a) > len(b) else (b, a)
        assert len(long_) == len(short) + 1
        assert any(long_[:i] + long_[i + 1 :] == short for i in range(len(long_)))
        return
    assert len(a) == len(b)
    diffs = [(x, y) for x, y in zip(a, b) if x != y]
    assert len(diffs) == (2 if pattern == "relative_position" else 1), pattern
    for x, y in diffs:
        changed = {k for k in x if x[k] != y[k]}
        assert changed and changed <= _MMVP_FIELDS[pattern], (pattern, changed)
        key = {
            "orientation": "orientation",
            "color": "color",
            "size": "size",
            "position": "x",
            "relative_position": "x",
            "shape": "kind",
        }[pattern]
        assert key in changed


def test_mmvp_official_layout_and_pairs(world):
    out, _ = world
    root = out / "mmvp"
    with open(root / "Questions.csv", newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    assert header == ["Index", "Question", "Options", "Correct Answer"]
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1)) and len(rows) % 2 == 0
    patterns = json.loads((root / "patterns.json").read_text())
    scenes = {r["index"]: r["scene"] for r in jsonl(root / "scenes.jsonl")}
    assert set(patterns.values()) >= {"orientation", "count", "color", "position", "presence", "size"}
    for r1, r2 in zip(rows[::2], rows[1::2]):
        i1, i2 = int(r1[0]), int(r2[0])
        assert r1[1] == r2[1] and r1[2] == r2[2] and r1[3] != r2[3]
        assert {r1[3], r2[3]} == {"(a)", "(b)"}
        assert patterns[str(i1)] == patterns[str(i2)]
        m = re.fullmatch(r"\(a\) (.+) \(b\) (.+)", r1[2])
        assert m, r1[2]
        options = {"(a)": m.group(1), "(b)": m.group(2)}
        for r, i in ((r1, i1), (r2, i2)):
            assert (root / "MMVP Images" / f"{i}.jpg").is_file()
            with Image.open(root / "MMVP Images" / f"{i}.jpg") as im:
                assert im.format == "JPEG" and im.size == (64, 64)
            assert options[r[3]] == _mmvp_answer(scenes[i], patterns[str(i)], r[1])
        _check_single_difference(scenes[i1]["shapes"], scenes[i2]["shapes"], patterns[str(i1)])


# ----------------------------------------------------------------------------------------------- POPE


def test_pope_balanced_and_truthful(world):
    out, _ = world
    scenes = {r["image"]: r["scene"] for r in jsonl(out / "pope" / "scenes.jsonl")}
    images = None
    for split in ("random", "popular", "adversarial"):
        rows = jsonl(out / "pope" / f"geoworld_pope_{split}.json")
        assert len(rows) == 60
        assert [r["question_id"] for r in rows] == list(range(1, 61))
        assert sum(r["label"] == "yes" for r in rows) == sum(r["label"] == "no" for r in rows)
        for r in rows:
            assert set(r) == {"question_id", "image", "text", "label"}
            m = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", r["text"])
            assert m, r["text"]
            present = any(
                s["color"] == m.group(1) and s["kind"] == m.group(2) for s in scenes[r["image"]]["shapes"]
            )
            assert present == (r["label"] == "yes"), r
        imgs = [r["image"] for r in rows]
        assert images is None or imgs == images
        images = imgs


# -------------------------------------------------------------------------------------------- RefCOCO


def test_refcoco_expressions_unique_and_boxes_match(world):
    out, _ = world
    rows = jsonl(out / "refcoco" / "refcoco_val.jsonl")
    side = {r["id"]: r for r in jsonl(out / "refcoco" / "scenes.jsonl")}
    assert len(rows) == 30
    for r in rows:
        assert set(r) == {"id", "image", "width", "height", "sentence", "bbox"}
        scene = side[r["id"]]["scene"]
        target = one(scene, r["sentence"])
        assert target == scene["shapes"][side[r["id"]]["target"]]
        x1, y1, x2, y2 = r["bbox"]
        assert r["bbox"] == target["box"] and 0 <= x1 < x2 <= r["width"] and 0 <= y1 < y2 <= r["height"]


# ------------------------------------------------------------------------------------------ MathVerse


def test_mathverse_versions(world):
    out, _ = world
    root = out / "mathverse"
    entries = json.loads((root / "testmini.json").read_text(encoding="utf-8"))
    text_only = json.loads((root / "testmini_text_only.json").read_text(encoding="utf-8"))
    figs = {r["image"]: r["scene"]["figure"] for r in jsonl(root / "scenes.jsonl")}
    assert [e["sample_index"] for e in entries] == [str(i) for i in range(1, len(entries) + 1)]
    by_problem: dict[str, list[dict]] = {}
    for e in entries:
        assert list(e) == MV_FIELDS
        by_problem.setdefault(e["problem_index"], []).append(e)
    assert len(by_problem) == 10 and len(text_only) == 10
    for pid, group in by_problem.items():
        assert [e["problem_version"] for e in group] == VERSIONS
        assert len({e["answer"] for e in group}) == 1
        qtype = group[0]["question_type"]
        assert qtype in ("multi-choice", "free-form")
        fig = figs[group[0]["image"]]
        cond_texts = [c["text"] for c in fig["conditions"]]
        if qtype == "multi-choice":
            choices = group[0]["metadata"]["choices"]
            assert group[0]["answer"] in "ABCD"
            assert choices["ABCD".index(group[0]["answer"])] == fig["answer"] + fig["unit"]
        else:
            assert group[0]["answer"] == fig["answer"] and group[0]["answer"].isdigit()
        drawn = {e["problem_version"]: set(figs[e["image"]]["drawn"]) for e in group}
        assert drawn["Text Dominant"] == drawn["Text Lite"] == set()
        assert set() < drawn["Vision Intensive"] < drawn["Vision Dominant"]
        assert drawn["Vision Dominant"] == drawn["Vision Only"] == {c["key"] for c in fig["conditions"]}
        assert len({e["image"] for e in group}) == 4
        assert figs[group[4]["image"]]["text_lines"] and not figs[group[3]["image"]]["text_lines"]
        for e in group:
            text = e["question"] + e["query_wo"] + e["query_cot"]
            version_fig = figs[e["image"]]
            for c in fig["conditions"]:
                in_text = c["text"] in e["question"]
                assert in_text == (c["key"] not in version_fig["drawn"]), (e["problem_version"], c)
            if e["problem_version"] == "Vision Only":
                assert not any(t in text for t in cond_texts) and "Choices" not in text
                assert not any(f"= {c['value']}" in text for c in fig["conditions"] if c["value"] is not None)
            else:
                assert e["question"].endswith(
                    fig["question"]
                    + (
                        ""
                        if qtype == "free-form"
                        else "\nChoices:\n" + "\n".join(f"{L}:{v}" for L, v in zip("ABCD", choices))
                    )
                )
                assert e["query_wo"].endswith("\nQuestion: " + e["question"])
        assert "As shown in the figure" in group[0]["question"] and "As shown" not in group[1]["question"]
        only = next(t for t in text_only if t["problem_index"] == pid)
        assert list(only) == MV_FIELDS and only["image"] == "" and only["problem_version"] == "Text Only"
        assert only["question"] == group[0]["question"] and only["answer"] == group[0]["answer"]


# ----------------------------------------------------------------------------------- held-out disjointness


def test_heldout_images_never_in_train(world):
    out, _ = world
    train = {hashlib.sha256(p.read_bytes()).digest() for p in (out / "images").glob("*.png")}
    held = [p for d in ("eval/images", "pope/images", "refcoco/images") for p in (out / d).glob("*.png")]
    assert held and not train & {hashlib.sha256(p.read_bytes()).digest() for p in held}


def test_math_scene_round_trips():
    from mllm.data.geoworld.sampling import math_training_scene

    for seed in range(20):
        scene = math_training_scene(random.Random(seed), 64)
        assert scene_from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


def test_fresh_redraws_seen_images():
    def make(rng):
        return sample_scene(rng, 64)

    first, _, _ = fresh(make, 0, "x", 0, set())
    seen = {pixel_key(render(sample_scene(stream(0, "x", 0), 64)))}
    again, img, _ = fresh(make, 0, "x", 0, seen)
    assert again != first and len(seen) == 2 and pixel_key(img) in seen


def test_iter_text(world):
    out, _ = world
    texts = list(iter_text(out))
    assert all(isinstance(t, str) and t for t in texts)
    assert not any("<image>" in t for t in texts)
    joined = "\n".join(texts)
    for needle in ("What color is", "Is there a", "Find the", "Which direction", "pointing"):
        assert needle in joined


# ------------------------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.sampled_from([48, 64, 96, 128]))
def test_scenes_never_overlap_and_boxes_in_bounds(seed, size):
    scene = sample_scene(random.Random(seed), size)
    assert scene_from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    shapes = scene.shapes
    assert 1 <= len(shapes) <= 5
    assert len({(s.kind, s.color, s.size) for s in shapes}) == len(shapes)
    for i, a in enumerate(shapes):
        assert a.radius >= 7 and a.kind in SHAPES
        assert a.region == region_of(a.x, a.y, size, size)
        x1, y1, x2, y2 = a.box
        assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
        assert a.x - a.radius - 1 <= x1 and x2 <= a.x + a.radius + 2
        for b in shapes[i + 1 :]:
            assert (a.x - b.x) ** 2 + (a.y - b.y) ** 2 > (a.radius + b.radius) ** 2
            bx1, by1, bx2, by2 = b.box
            assert x2 <= bx1 or bx2 <= x1 or y2 <= by1 or by2 <= y1 or _no_pixel_overlap(scene, a, b)


def _no_pixel_overlap(scene, a, b) -> bool:
    from PIL import ImageDraw

    from mllm.data.geoworld.geometry import draw_shape

    masks = []
    for s in (a, b):
        m = Image.new("L", (scene.width, scene.height), 0)
        draw_shape(ImageDraw.Draw(m), s.kind, s.x, s.y, s.radius, s.angle, 255)
        masks.append(np.asarray(m) > 0)
    return not (masks[0] & masks[1]).any()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_every_generated_question_is_unambiguous_and_right(seed):
    rng = random.Random(seed)
    scene = sample_scene(rng, 64)
    d = scene.to_dict()
    for i in range(len(scene.shapes)):
        assert resolve(d, refer(scene, i)) == [i]
    for cat, qas in qa_pool(scene, rng).items():
        for q, a in qas:
            assert expected_answer(d, q) == a, (cat, q, a)


@pytest.mark.parametrize(
    "bench, param, small_n, n", [("pope", "pope_questions", 12, 48), ("mmvp", "mmvp_pairs", 8, 24)]
)
def test_a_larger_held_out_set_for_a_written_world_is_what_the_world_would_have_held(
    tmp_path, bench, param, small_n, n
):
    """write_held_out_at(world, out, bench, N) writes, byte for byte, the set `write_world` writes with
    that size N (so its first items are the world's own, and the rest are checked against the same
    training and held-out images), and refuses to overwrite the world's own set."""
    small = dict(n=40, size=64, n_eval=16, mmvp_pairs=8, pope_questions=12, refcoco_n=4, mathverse_problems=2)
    write_world(tmp_path / "own", seed=5, **{**small, param: small_n}, mmvp_vlm_pairs=1)
    write_world(tmp_path / "big", seed=5, **{**small, param: n}, mmvp_vlm_pairs=1)
    assert write_held_out_at(tmp_path / "own", tmp_path / "larger", bench, n) == n * (
        3 if bench == "pope" else 2
    )
    want_root, got_root = tmp_path / "big" / bench, tmp_path / "larger" / bench
    want = sorted(p.relative_to(want_root) for p in want_root.rglob("*"))
    assert sorted(p.relative_to(got_root) for p in got_root.rglob("*")) == want and len(want) > 8
    for rel in want:
        if (want_root / rel).is_file():
            assert (got_root / rel).read_bytes() == (want_root / rel).read_bytes(), rel
    first = (tmp_path / "own" / bench / "scenes.jsonl").read_text().splitlines()
    assert (got_root / "scenes.jsonl").read_text().splitlines()[: len(first)] == first
    with pytest.raises(ValueError, match="beside the world"):
        write_held_out_at(tmp_path / "own", tmp_path / "own", bench, n)
    with pytest.raises(ValueError, match="not 'eval'"):
        write_held_out_at(tmp_path / "own", tmp_path / "x", "eval", n)
