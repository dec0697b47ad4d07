"""Benchmark loaders on a written GeoWorld, and every scorer on hand-written predictions whose right
scores are worked out by hand here (pairs, POPE yes-ratio of predictions, MathVerse's five-version
mean, IoU thresholds), plus the error paths of the model-free scoring route."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from mllm.data.geoworld import write_world
from mllm.evaluation.benchmarks import (
    BENCHMARKS,
    BenchmarkError,
    get_benchmark,
    read_predictions,
    score_predictions,
    write_report,
)

# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("geoworld")
    write_world(
        root,
        seed=0,
        n=20,
        size=64,
        n_eval=16,
        mmvp_pairs=8,
        pope_questions=24,
        refcoco_n=16,
        mathverse_problems=4,
    )
    return root


def _image(path: Path, size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (128, 128, 128)).save(path)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _preds(path: Path, id_key: str, responses: dict) -> Path:
    return _jsonl(path, [{id_key: k, "response": v} for k, v in responses.items()])


def _mmvp(root: Path, answers: list[str]) -> Path:
    lines = ["Index,Question,Options,Correct Answer"]
    for i, a in enumerate(answers, 1):
        lines.append(f"{i},Are the eyes open or closed?,(a) Open (b) Closed,{a}")
        _image(root / "MMVP Images" / f"{i}.jpg")
    (root / "Questions.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


# --------------------------------------------------------------------------------------------------
# Registry and loaders on GeoWorld
# --------------------------------------------------------------------------------------------------


def test_registry():
    assert {"mmvp", "pope", "mathverse", "refcoco", "qa"} <= set(BENCHMARKS)
    assert get_benchmark("pope").id_key == "question_id"
    with pytest.raises(ValueError, match="unknown benchmark 'nope'.*mathverse.*mmvp"):
        get_benchmark("nope")


def test_load_every_benchmark_on_geoworld(world):
    mmvp = get_benchmark("mmvp").load(world / "mmvp")
    assert [it.id for it in mmvp] == [str(i) for i in range(1, 17)]
    assert mmvp[0].prompt.endswith("(a) down (b) up") and "<image>" not in mmvp[0].prompt
    assert mmvp[0].image.is_absolute() and mmvp[0].image.name == "1.jpg"
    assert [it.meta["pair"] for it in mmvp[:4]] == [1, 1, 2, 2]

    pope = get_benchmark("pope").load(world / "pope")
    assert len(pope) == 72 and pope[0].id == "random/1" and pope[-1].id == "adversarial/24"
    assert {it.meta["label"] for it in pope} == {"yes", "no"} and all(it.image.is_file() for it in pope)

    mv = get_benchmark("mathverse").load(world / "mathverse")
    assert len(mv) == 4 * 5 + 4
    assert mv[0].prompt.startswith("Please directly answer") and mv[-1].id == "text_only/4"
    assert mv[-1].image is None and mv[0].image.is_file()
    vo = next(
        it for it in mv if it.meta["version"] == "Vision Only" and it.meta["question_type"] == "multi-choice"
    )
    assert set(vo.meta["choices"]) == {"A", "B", "C", "D"}  # borrowed from the problem's other versions
    cot = get_benchmark("mathverse").load(world / "mathverse", cot=True, text_only=False)
    assert len(cot) == 20 and cot[0].prompt.startswith("Please first conduct reasoning")

    ref = get_benchmark("refcoco").load(world / "refcoco")
    assert len(ref) == 16 and ref[0].id == "refcoco-000000"
    assert ref[0].prompt.startswith(
        "Please provide the bounding box coordinate of the region this sentence describes: "
    )

    qa = get_benchmark("qa").load(world)
    assert len(qa) == 16 and qa[0].id == "eval-000000" and qa[0].image.is_file()
    assert [it.id for it in get_benchmark("qa").load(world / "eval")] == [it.id for it in qa]


def test_letter_prompt(world):
    item = get_benchmark("mmvp").load(world / "mmvp", letter_prompt=True)[0]
    assert item.prompt == (
        "Which direction is the triangle pointing?\nA. down\nB. up\n"
        "Answer with the option's letter from the given choices directly."
    )
    _, records = get_benchmark("mmvp").score([item], {"1": "B"})
    assert records[0]["extracted"] == "b" and records[0]["correct"]  # (b) is "up", the answer of Index 1


def test_geoworld_truths_score_full_marks(world):
    """The references themselves, dressed as a model would, score 100 everywhere."""
    for name, sub in (("mmvp", "mmvp"), ("pope", "pope"), ("mathverse", "mathverse"), ("qa", "")):
        bench = get_benchmark(name)
        items = bench.load(world / sub)
        dressed = {
            "mmvp": lambda m: f"The answer is ({m['answer']}).",
            "pope": lambda m: f"{m['label'].capitalize()}, I think.",
            "mathverse": lambda m: f"Answer: {m['answer']}",
            "qa": lambda m: m["answer"],
        }[name]
        metrics, records = bench.score(items, {it.id: dressed(it.meta) for it in items})
        assert all(r["correct"] for r in records), name
        unparsed = metrics["random"]["unparsed"] if name == "pope" else metrics["unparsed"]
        assert unparsed == 0


# --------------------------------------------------------------------------------------------------
# MMVP
# --------------------------------------------------------------------------------------------------


def test_mmvp_pairs_by_hand(tmp_path):
    data = _mmvp(tmp_path / "mmvp", ["(a)", "(b)", "(b)", "(a)"])
    bench = get_benchmark("mmvp")
    items = bench.load(data)
    # pair 1: both right; pair 2: Index 3 right, Index 4 wrong ("Closed" is (b), the answer is (a))
    metrics, records = bench.score(items, {"1": "(a)", "2": "The answer is b", "3": "**B**", "4": "Closed"})
    assert metrics == {"pair_accuracy": 50.0, "question_accuracy": 75.0, "unparsed": 0, "pairs": 2}
    assert [r["correct"] for r in records] == [True, True, True, False]
    assert records[3]["extracted"] == "b"

    # a missing id is unparsed, never dropped: Index 4 has no prediction
    metrics, records = bench.score(items, {"1": "(a)", "2": "b", "3": "There is a dog, so B"})
    assert metrics == {"pair_accuracy": 50.0, "question_accuracy": 75.0, "unparsed": 1, "pairs": 2}
    assert records[3]["missing"] and records[3]["extracted"] is None


def test_mmvp_answer_override(tmp_path):
    data = _mmvp(tmp_path / "mmvp", ["(a)", "(b)", "(b)", "(a)"])
    overrides = tmp_path / "errata.json"
    overrides.write_text(json.dumps({"4": "(b)"}))
    bench = get_benchmark("mmvp")
    items = bench.load(data, answer_overrides=overrides)
    assert items[3].meta["answer"] == "b" and items[3].meta["original_answer"] == "a"
    metrics, records = bench.score(items, {"1": "(a)", "2": "b", "3": "B", "4": "Closed"})
    assert metrics["pair_accuracy"] == 100.0 and metrics["question_accuracy"] == 100.0
    assert records[3]["overridden"] and records[3]["original_answer"] == "a"
    overrides.write_text(json.dumps({"99": "(b)"}))
    with pytest.raises(BenchmarkError, match="99"):
        bench.load(data, answer_overrides=overrides)


# --------------------------------------------------------------------------------------------------
# POPE
# --------------------------------------------------------------------------------------------------


def _pope(root: Path) -> Path:
    for split in ("random", "popular"):
        rows = [
            {"question_id": i, "image": "x.png", "text": "Is there a dog in the image?", "label": label}
            for i, label in enumerate(["yes", "yes", "no", "no"], 1)
        ]
        _jsonl(root / f"toy_pope_{split}.json", rows)
    _image(root / "images" / "x.png")
    return root


def test_pope_by_hand(tmp_path):
    bench = get_benchmark("pope")
    items = bench.load(_pope(tmp_path / "pope"))
    assert [it.id for it in items][:5] == ["random/1", "random/2", "random/3", "random/4", "popular/1"]
    responses = {
        # random: predictions yes, yes, yes, no against labels yes, yes, no, no -> TP 2, FP 1, TN 1, FN 0
        "random/1": "Yes, there is a dog.",
        "random/2": "Yes.",
        "random/3": "Yes",
        "random/4": "No, there is not.",
        # popular: yes, (empty), no, no -> TP 1, FN 1 (unparsed), TN 2
        "popular/1": "yes",
        "popular/2": "",
        "popular/3": "There is not a dog.",
        "popular/4": "No",
    }
    metrics, records = bench.score(items, responses)
    r = metrics["random"]
    assert r["accuracy"] == 75.0
    assert r["precision"] == pytest.approx(100 * 2 / 3)
    assert r["recall"] == 100.0
    assert r["f1"] == pytest.approx(2 * (200 / 3) * 100 / (200 / 3 + 100))  # 80
    assert r["yes_ratio"] == 75.0  # of predictions: the labels' yes share is 50
    assert r["unparsed"] == 0
    p = metrics["popular"]
    assert p == pytest.approx(
        {
            "accuracy": 75.0,
            "precision": 100.0,
            "recall": 50.0,
            "f1": 2 * 100 * 50 / 150,
            "yes_ratio": 25.0,
            "unparsed": 1,
        }
    )
    assert metrics["mean_f1"] == pytest.approx((80.0 + 200 / 3) / 2)
    assert "adversarial" not in metrics
    assert records[1]["extracted"] == "yes" and records[5]["extracted"] is None


def test_pope_strict_rule_and_split_choice(tmp_path):
    bench = get_benchmark("pope")
    items = bench.load(_pope(tmp_path / "pope"), splits=["random"])
    assert len(items) == 4
    resp = {"random/1": "I think so", "random/2": "yes", "random/3": "I don't think so", "random/4": "no"}
    official, _ = bench.score(items, resp)
    strict, _ = bench.score(items, resp, rule="strict")
    assert official["random"]["accuracy"] == 75.0  # the official rule reads "I don't think so" as yes
    assert strict["random"]["accuracy"] == 100.0
    with pytest.raises(FileNotFoundError, match="adversarial"):
        bench.load(tmp_path / "pope", splits=["adversarial"])


# --------------------------------------------------------------------------------------------------
# MathVerse
# --------------------------------------------------------------------------------------------------

VERSIONS = ("Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only")


def _mathverse(root: Path) -> Path:
    rows, text_only = [], []
    choices = "\nChoices:\nA:60°\nB:35°\nC:50°\nD:30°"
    for pid, qtype, answer in (("1", "multi-choice", "C"), ("2", "free-form", "12")):
        for version in VERSIONS:
            question = "Find the measure of angle C." + choices if qtype == "multi-choice" else "Find AB."
            if version == "Vision Only":
                question = "According to the question shown in the image, please answer the question."
            image = f"{pid}_{version[:2]}.png"
            _image(root / "images" / image)
            rows.append(
                {
                    "sample_index": str(len(rows) + 1),
                    "problem_index": pid,
                    "problem_version": version,
                    "question": question,
                    "image": image,
                    "answer": answer,
                    "question_type": qtype,
                    "metadata": {},
                    "query_wo": f"Answer directly.\nQuestion: {question}",
                    "query_cot": f"Reason first.\nQuestion: {question}",
                }
            )
        text_only.append(
            {**rows[-5], "sample_index": str(len(text_only) + 1), "problem_version": "Text Only", "image": ""}
        )
    (root / "testmini.json").write_text(json.dumps(rows))
    (root / "testmini_text_only.json").write_text(json.dumps(text_only))
    return root


def test_mathverse_five_version_mean_by_hand(tmp_path):
    bench = get_benchmark("mathverse")
    items = bench.load(_mathverse(tmp_path / "mv"))
    assert [it.id for it in items][-2:] == ["text_only/1", "text_only/2"]
    # sample_index: problem 1 (MC, answer C) is 1-5, problem 2 (free-form, 12) is 6-10, both by version order
    responses = {
        "1": "C",
        "6": "The answer is 12 cm.",  # Text Dominant 2/2 -> 100
        "2": "(C) 50°",
        "7": "13",  # Text Lite 1/2 -> 50
        "3": "50 degrees",
        "8": "",  # Vision Intensive 1/2 -> 50, one unparsed
        "4": "B",
        "9": "\\boxed{11}",  # Vision Dominant 0/2 -> 0
        "5": "So angle C = 50°.",
        "10": "AB = 12",  # Vision Only 2/2 -> 100 (choices borrowed from siblings)
        "text_only/1": "C",
        "text_only/2": "12",  # Text Only 2/2 -> 100, excluded from "all"
    }
    metrics, records = bench.score(items, responses)
    assert metrics["versions"] == {
        "Text Dominant": 100.0,
        "Text Lite": 50.0,
        "Vision Intensive": 50.0,
        "Vision Dominant": 0.0,
        "Vision Only": 100.0,
    }
    assert metrics["all"] == pytest.approx(
        60.0
    )  # mean of five versions; with Text Only items it would be 66.7
    assert metrics["text_only"] == 100.0
    assert metrics["unparsed"] == 1
    assert records[0]["extracted"] == "C" and records[5]["extracted"] == 12.0
    no_text_only = bench.load(tmp_path / "mv", text_only=False)
    m2, _ = bench.score(no_text_only, {k: v for k, v in responses.items() if not k.startswith("text_only")})
    assert m2["text_only"] is None and m2["all"] == pytest.approx(60.0)


def test_mathverse_free_form_tolerance_and_strings(tmp_path):
    bench = get_benchmark("mathverse")
    items = bench.load(_mathverse(tmp_path / "mv"), text_only=False)
    item = items[5]
    item.meta["answer"] = "2\\sqrt{3}"  # 3.4641...; a value rounded to its own decimals counts
    for resp, ok in (
        ("2√3", True),
        ("3.46", True),
        ("3.5", True),
        ("3.47", False),
        ("3.4", False),
        ("\\frac{\\sqrt{12}}{1}", True),
    ):
        _, records = bench.score([item], {item.id: resp})
        assert records[0]["correct"] is ok, resp
    item.meta["answer"] = "(1, 3]"
    _, records = bench.score([item], {item.id: "Reasoning ...\nAnswer: ( 1,3 ]"})
    assert records[0]["correct"]


# --------------------------------------------------------------------------------------------------
# Grounding
# --------------------------------------------------------------------------------------------------


def _refcoco(root: Path) -> Path:
    _image(root / "images" / "wide.png", (100, 50))
    rows = [
        {
            "id": f"r{i}",
            "image": "wide.png",
            "width": 100,
            "height": 50,
            "sentence": "the red circle",
            "bbox": [10, 10, 30, 30],
        }
        for i in range(4)
    ]
    return _jsonl(root / "refcoco_val.jsonl", rows).parent


def test_grounding_by_hand(tmp_path):
    bench = get_benchmark("refcoco")
    items = bench.load(_refcoco(tmp_path / "ref"))
    # GT [10,10,30,30] in a 100x50 image (norm1: x/100, y/50)
    responses = {
        "r0": "[0.10, 0.20, 0.30, 0.60]",  # exact -> IoU 1
        "r1": "[0.20, 0.20, 0.40, 0.60]",  # [20,10,40,30]: inter 10*20=200, union 400+400-200=600 -> 1/3
        "r2": "[0.10, 0.20, 0.25, 0.60]",  # [10,10,25,30]: inter 300, union 400 -> 0.75
        "r3": "I cannot find it.",  # unparsed -> IoU 0
    }
    metrics, records = bench.score(items, responses)
    ious = [1.0, 1 / 3, 0.75, 0.0]
    assert [r["iou"] for r in records] == pytest.approx(ious)
    assert metrics == pytest.approx(
        {"acc@0.5": 50.0, "acc@0.25": 75.0, "acc@0.75": 50.0, "miou": 100 * sum(ious) / 4, "unparsed": 1}
    )
    # the same box for a model that saw the image padded to 100x100 (25 px bars above and below)
    padded = {"r0": "[0.10, 0.35, 0.30, 0.55]"}
    _, rec = bench.score(items[:1], padded, pad_to_square=True)
    assert rec[0]["iou"] == pytest.approx(1.0)
    _, rec = bench.score(items[:1], padded)  # declared wrongly: y 17.5-27.5 instead of 10-30
    assert rec[0]["iou"] == pytest.approx(0.5)
    _, rec = bench.score(items[:1], {"r0": "[100, 200, 300, 600]"}, box_format="norm1000")
    assert rec[0]["iou"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="box_format"):
        bench.score(items, responses, box_format="guess")


# --------------------------------------------------------------------------------------------------
# GeoWorld QA
# --------------------------------------------------------------------------------------------------


def test_qa_by_hand(world):
    bench = get_benchmark("qa")
    items = bench.load(world)
    by_cat = {it.meta["category"]: it for it in items[:8]}
    responses = {
        by_cat["colour"].id: "Yellow.",  # right: normalised exact match
        by_cat["shape"].id: "It is a triangle",  # wrong: not an exact short answer
        by_cat["count"].id: "1 shape",  # right: numeric
        by_cat["existence"].id: "Yes, there is.",  # right: yes/no
        by_cat["math"].id: "",  # unparsed
    }
    metrics, _ = bench.score(items[:8], responses)
    assert metrics["n"] == 8
    assert metrics["accuracy"] == pytest.approx(100 * 3 / 8)
    assert metrics["unparsed"] == 4  # math (empty) + position, orientation, size (no prediction)
    assert metrics["per_category"]["colour"] == 100.0 and metrics["per_category"]["shape"] == 0.0


def test_qa_option_letters(tmp_path):
    _image(tmp_path / "eval" / "images" / "0.png")
    _jsonl(
        tmp_path / "eval" / "qa.jsonl",
        [
            {
                "id": "q0",
                "image": "eval/images/0.png",
                "question": "Is it up or down? (a) up (b) down",
                "answer": "(b)",
                "category": "orientation",
            },
            {
                "id": "q1",
                "image": "eval/images/0.png",
                "question": "What color? (a) red (b) blue",
                "answer": "red",
                "category": "colour",
            },
        ],
    )
    bench = get_benchmark("qa")
    metrics, _ = bench.score(bench.load(tmp_path), {"q0": "Down", "q1": "(a)"})
    assert metrics["accuracy"] == 100.0


# --------------------------------------------------------------------------------------------------
# The model-free path and its errors
# --------------------------------------------------------------------------------------------------


def test_score_predictions_writes_report(tmp_path):
    data = _mmvp(tmp_path / "mmvp", ["(a)", "(b)", "(b)", "(a)"])
    preds = _jsonl(
        tmp_path / "preds.jsonl",
        [
            {"Index": 1, "response": "(a)"},
            {"Index": "2", "response": "b"},
            {"Index": 3, "response": "B"},
        ],
    )
    out = tmp_path / "out" / "mmvp.json"
    metrics = score_predictions("mmvp", data, preds, out)
    assert metrics == {"pair_accuracy": 50.0, "question_accuracy": 75.0, "unparsed": 1, "pairs": 2}
    written = json.loads(out.read_text())
    assert written["meta"]["benchmark"] == "mmvp"
    assert {k: v for k, v in written.items() if k != "meta"} == metrics
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["1", "2", "3", "4"] and records[3]["missing"]
    assert {"id", "prompt", "response", "extracted", "correct"} <= set(records[0])

    paths = write_report(tmp_path / "plain", {"x": 1.0}, [{"id": "a"}])
    assert paths[0].name == "plain.json" and paths[1].name == "plain.jsonl"
    assert json.loads(paths[0].read_text()) == {"x": 1.0}


def test_unknown_prediction_ids_are_an_error(tmp_path):
    data = _mmvp(tmp_path / "mmvp", ["(a)", "(b)"])
    preds = _preds(tmp_path / "p.jsonl", "Index", {"1": "(a)", "7": "(b)", "ghost": "(a)"})
    with pytest.raises(BenchmarkError, match=r"p\.jsonl.*2 Index.*'7'.*'ghost'"):
        score_predictions("mmvp", data, preds, None)
    with pytest.raises(BenchmarkError, match="'7'"):
        get_benchmark("mmvp").score(get_benchmark("mmvp").load(data), {"7": "(a)"})
    # POPE ids are split-qualified: a bare question_id is unknown
    pope = _pope(tmp_path / "pope")
    with pytest.raises(BenchmarkError, match="'1'"):
        score_predictions("pope", pope, _preds(tmp_path / "pp.jsonl", "question_id", {"1": "yes"}), None)


def test_duplicate_and_malformed_predictions(tmp_path):
    dup = _jsonl(tmp_path / "dup.jsonl", [{"Index": 1, "response": "a"}, {"Index": "1", "response": "b"}])
    with pytest.raises(BenchmarkError, match=r"dup\.jsonl:2: duplicate Index '1' \(first on line 1\)"):
        read_predictions(dup, "Index")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"Index": 1, "response": "a"}\n{not json\n')
    with pytest.raises(BenchmarkError, match=r"bad\.jsonl:2"):
        read_predictions(bad, "Index")
    nokey = _jsonl(tmp_path / "nokey.jsonl", [{"id": 1, "response": "a"}])
    with pytest.raises(BenchmarkError, match=r"nokey\.jsonl:1.*Index"):
        read_predictions(nokey, "Index")
    assert read_predictions(_jsonl(tmp_path / "ok.jsonl", [{"Index": 3, "response": "x"}]), "Index") == {
        "3": "x"
    }


def test_missing_images_and_files_are_named(tmp_path):
    data = _mmvp(tmp_path / "mmvp", ["(a)", "(b)"])
    (data / "MMVP Images" / "2.jpg").unlink()
    with pytest.raises(BenchmarkError, match=r"2\.jpg.*Index 2"):
        get_benchmark("mmvp").load(data)
    pope = _pope(tmp_path / "pope")
    (pope / "images" / "x.png").unlink()
    with pytest.raises(BenchmarkError, match=r"toy_pope_random\.json:1.*x\.png"):
        get_benchmark("pope").load(pope)
    ref = _refcoco(tmp_path / "ref")
    (ref / "images" / "wide.png").unlink()
    with pytest.raises(BenchmarkError, match=r"id r0.*wide\.png"):
        get_benchmark("refcoco").load(ref)
    mv = _mathverse(tmp_path / "mv")
    (mv / "images" / "1_Te.png").unlink()
    with pytest.raises(BenchmarkError, match=r"sample_index 1\).*1_Te\.png"):
        get_benchmark("mathverse").load(mv)
    with pytest.raises(FileNotFoundError, match="Questions.csv"):
        get_benchmark("mmvp").load(tmp_path / "nowhere")


def test_options_are_routed_and_typos_refused(tmp_path):
    ref = _refcoco(tmp_path / "ref")
    preds = _preds(tmp_path / "p.jsonl", "id", {"r0": "[10, 10, 30, 30]"})
    metrics = score_predictions("refcoco", ref, preds, None, box_format="pixel", file="refcoco_val.jsonl")
    assert metrics["acc@0.5"] == 25.0 and metrics["unparsed"] == 3
    with pytest.raises(TypeError, match="box_fromat"):
        score_predictions("refcoco", ref, preds, None, box_fromat="pixel")
    # a runner may hand one options dict to both halves: each ignores the other's options
    bench = get_benchmark("refcoco")
    assert set(bench.options) == {
        "file",
        "images",
        "box_format",
        "pad_to_square",
        "rule",
        "split",
        "split_by",
        "layout",
    }
    opts = {"box_format": "pixel", "file": "refcoco_val.jsonl"}
    metrics, _ = bench.score(bench.load(ref, **opts), {"r0": "[10, 10, 30, 30]"}, **opts)
    assert metrics["acc@0.5"] == 25.0
    with pytest.raises(TypeError, match="letter_promt"):
        get_benchmark("mmvp").load(tmp_path / "unused", letter_promt=True)


def test_pope_collision_free_ids_on_geoworld(world, tmp_path):
    bench = get_benchmark("pope")
    items = bench.load(world / "pope")
    assert len({it.id for it in items}) == len(items)
    responses = {it.id: "No" for it in items}
    metrics = score_predictions(
        "pope", world / "pope", _preds(tmp_path / "p.jsonl", "question_id", responses), None
    )
    for split in ("random", "popular", "adversarial"):
        assert metrics[split]["yes_ratio"] == 0.0 and metrics[split]["accuracy"] == 50.0
        assert metrics[split]["f1"] == 0.0
    assert math.isclose(metrics["mean_f1"], 0.0)
