"""The evaluators on rows shaped like the real public files (issue 20), each case worked out by hand.

- MathVerse testmini rows (ZrrSkywalker/MathVerse's fields) whose answers carry units with exponents,
  fractions of roots, words and a value written twice, answered the way real models answer them;
- MMVP `Questions.csv` with options that differ only by punctuation;
- RefCOCO in lmms-lab/RefCOCO's rows (JSON lines; parquet with embedded images where pyarrow is
  installed) and in refer's `refs(unc).p` + `instances.json`;
- other tools' predictions files: LLaVA's answers files (POPE, MMVP's evaluate_mllm.py), lmms-eval's
  --log_samples output, MathVerse's output file, VLMEvalKit's tables (.tsv; .xlsx with openpyxl);
- `rule=official` (POPE's empty answer, lmms-eval's RefCOCO boxes) recorded in the report, and every
  bad input a one-line error naming the file and the line or id.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import pickle
from pathlib import Path

import pytest
from PIL import Image

from mllm.cli import main as cli_main
from mllm.evaluation.benchmarks import (
    PREDICTION_LAYOUTS,
    BenchmarkError,
    OptionError,
    get_benchmark,
    score_predictions,
    score_predictions_file,
)
from mllm.evaluation.benchmarks.mathverse import clean_answer
from mllm.evaluation.report import load_results, render

# --------------------------------------------------------------------------------------------------
# Writers of the public layouts
# --------------------------------------------------------------------------------------------------


def _image(path: Path, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (128, 128, 128)).save(path)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _tsv(path: Path, rows: list[dict]) -> Path:
    """A table as VLMEvalKit dumps one: tab-separated, every field quoted (pandas, QUOTE_ALL)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t", quoting=csv.QUOTE_ALL)
        writer.writeheader()
        writer.writerows(rows)
    return path


FREE = "Please directly answer the question and provide the final value, e.g., 1, 2.5, 300.\nQuestion: "
# (answer, question) of real testmini free-form shapes
MATHVERSE_FREE = [
    ("720 \\mathrm{cm}^3", "Find the volume of the prism."),
    ("Area $=113.1 \\mathrm{~cm}^{2}$", "Find the area of the circle, correct to one decimal place."),
    ("\\frac{9\\sqrt{3}}{2}", "Find the exact area of the triangle."),
    ("even", "Is the function odd, even, or neither?"),
    ("-4.9\n-4.9", "Find the y-intercept of the parabola."),
    ("2500\\pi \\mathrm{cm}^2", "Find the surface area of the sphere, in terms of pi."),
]


def _mathverse(root: Path) -> Path:
    rows = []
    for pid, (answer, question) in enumerate(MATHVERSE_FREE, 1):
        image = f"images_version_1-4/image_{pid}.png"
        _image(root / "images" / image)
        rows.append(
            {
                "sample_index": str(pid),
                "problem_index": str(pid),
                "problem_version": "Text Lite",
                "question": question,
                "image": image,
                "answer": answer,
                "question_type": "free-form",
                "metadata": {
                    "split": "testmini",
                    "source": "Geo3D_collected",
                    "subject": "Solid Geometry",
                    "subfield": "Area",
                },
                "query_wo": FREE + question,
                "query_cot": "Please first conduct reasoning, and then answer the question and provide the "
                "final value, e.g., 1, 2.5, 300, at the end.\nQuestion: " + question,
            }
        )
    text_only = [{**rows[0], "problem_version": "Text Only", "image": ""}]
    (root / "testmini.json").write_text(json.dumps(rows, indent=4))
    (root / "testmini_text_only.json").write_text(json.dumps(text_only, indent=4))
    return root


def _mmvp(root: Path) -> Path:
    rows = [
        ("1", "Are the butterfly's wings closer to being open or closed?", "(a) Open (b) Closed", "(a)"),
        ("2", "Are the butterfly's wings closer to being open or closed?", "(a) Open (b) Closed", "(b)"),
        ("3", "What does the text on the card say?", '(a) "Happy Easter" (b) "Happy Easter!"', "(b)"),
        ("4", "What does the text on the card say?", '(a) "Happy Easter" (b) "Happy Easter!"', "(a)"),
    ]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "Questions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["Index", "Question", "Options", "Correct Answer"])
        writer.writerows(rows)
    for index, *_ in rows:
        _image(root / "MMVP Images" / f"{index}.jpg")
    return root


def _pope(root: Path, splits=("random", "popular", "adversarial")) -> Path:
    objects = [("snowboard", "yes"), ("dog", "no"), ("car", "yes"), ("zebra", "no")]
    for split in splits:
        _jsonl(
            root / f"coco_pope_{split}.json",
            [
                {
                    "question_id": i,
                    "image": f"COCO_val2014_00000031019{i}.jpg",
                    "text": f"Is there a {obj} in the image?",
                    "label": label,
                }
                for i, (obj, label) in enumerate(objects, 1)
            ],
        )
    for i in range(1, 5):
        _image(root / "images" / f"COCO_val2014_00000031019{i}.jpg")
    return root


def _png_bytes(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


LMMS_ROWS = [
    {
        "question_id": "refcoco_val_0",
        "question": "Please carefully observe the area circled in the image and come up with a caption.",
        "answer": ["guy in black", "man on left", "left man"],
        "segmentation": [10.0, 20.0, 40.0, 20.0, 40.0, 60.0],
        "bbox": [10.0, 20.0, 30.0, 40.0],  # x, y, w, h in pixels
        "iscrowd": 0,
        "file_name": "COCO_train2014_000000581857.jpg",
    },
    {
        "question_id": "refcoco_val_1",
        "question": "Please carefully observe the area circled in the image and come up with a caption.",
        "answer": ["right woman", "right woman"],  # real rows repeat a sentence
        "segmentation": [60.0, 10.0, 90.0, 10.0, 90.0, 50.0],
        "bbox": [60.0, 10.0, 30.0, 40.0],
        "iscrowd": 0,
        "file_name": "COCO_train2014_000000581857.jpg",
    },
]


def _refer(root: Path, refs: list | None = None, protocol: int = 2) -> Path:
    """refer's files: refs(unc).p (a pickle of plain dicts, as refer.py loads) and instances.json."""
    root.mkdir(parents=True, exist_ok=True)
    refs = refs or [
        {
            "sent_ids": [0, 1],
            "file_name": "COCO_train2014_000000581857_16.jpg",
            "ann_id": 1719310,
            "ref_id": 0,
            "image_id": 581857,
            "split": "val",
            "sentences": [
                {
                    "tokens": ["the", "lady"],
                    "raw": "THE LADY WITH THE BLUE SHIRT",
                    "sent_id": 0,
                    "sent": "the lady",
                },
                {"tokens": ["lady"], "raw": "lady w back to us", "sent_id": 1, "sent": "lady w back to us"},
            ],
            "category_id": 1,
        },
        {
            "sent_ids": [2],
            "file_name": "COCO_train2014_000000581857_17.jpg",
            "ann_id": 1719311,
            "ref_id": 1,
            "image_id": 581857,
            "split": "testA",
            "sentences": [{"tokens": ["man"], "raw": "man", "sent_id": 2, "sent": "man"}],
            "category_id": 1,
        },
    ]
    (root / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=protocol))
    instances = {
        "images": [
            {"file_name": "COCO_train2014_000000581857.jpg", "height": 50, "width": 100, "id": 581857}
        ],
        "annotations": [
            {
                "segmentation": [[0, 0]],
                "area": 800.0,
                "iscrowd": 0,
                "image_id": 581857,
                "bbox": [10, 10, 20, 40],
                "category_id": 1,
                "id": 1719310,
            },
            {
                "segmentation": [[0, 0]],
                "area": 100.0,
                "iscrowd": 0,
                "image_id": 581857,
                "bbox": [50, 0, 10, 10],
                "category_id": 1,
                "id": 1719311,
            },
        ],
        "categories": [{"supercategory": "person", "id": 1, "name": "person"}],
    }
    (root / "instances.json").write_text(json.dumps(instances))
    _image(root / "images" / "COCO_train2014_000000581857.jpg", (100, 50))
    return root


# --------------------------------------------------------------------------------------------------
# MathVerse: units with exponents, fractions of roots, words, an answer written twice
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sid,response,ok",
    [
        ("1", "720", True),  # the bare value the official prompt asks for
        ("1", "\\boxed{720}", True),
        ("1", "The volume is 720 cm^3.", True),
        ("1", "V = 720 \\mathrm{cm}^3", True),
        ("1", "3", False),  # the exponent is no answer
        ("2", "113.1", True),
        ("2", "Area = 113.1 cm²", True),
        ("2", "2", False),
        ("3", "9√3/2", True),
        ("3", "\\frac{9\\sqrt{3}}{2}", True),
        ("3", "7.79", True),
        ("3", "9", False),
        ("4", "The function is even.", True),
        ("4", "even", True),
        ("4", "It is not even, it is odd.", False),
        ("4", "The function is neither even nor odd.", False),
        ("5", "-4.9", True),
        ("5", "The y-intercept is -4.9.", True),
        ("5", "4.9", False),
        ("6", "2500π cm²", True),
        ("6", "2500\\pi", True),
        ("6", "2500", False),
    ],
)
def test_mathverse_answer_shapes(tmp_path, sid, response, ok):
    bench = get_benchmark("mathverse")
    items = [it for it in bench.load(_mathverse(tmp_path / "mv"), text_only=False) if it.id == sid]
    _, records = bench.score(items, {sid: response})
    assert records[0]["correct"] is ok, (items[0].meta["answer"], response)


def test_mathverse_answer_written_twice_is_one_answer():
    assert clean_answer("-4.9\n-4.9") == "-4.9"
    assert clean_answer("-4.9") == "-4.9"
    assert clean_answer("y=2\ny=3") == "y=2\ny=3"  # two different lines stay as written
    for text in ("-4.9\n-4.9", " a\n\na ", "x", "1\n2"):
        assert clean_answer(clean_answer(text)) == clean_answer(text)


# --------------------------------------------------------------------------------------------------
# MMVP: options that differ only by punctuation
# --------------------------------------------------------------------------------------------------


def test_mmvp_options_differing_by_punctuation(tmp_path):
    bench = get_benchmark("mmvp")
    items = bench.load(_mmvp(tmp_path / "mmvp"))
    assert items[2].meta["options"] == {"a": '"Happy Easter"', "b": '"Happy Easter!"'}
    metrics, records = bench.score(
        items,
        {"1": "Open", "2": "(b) Closed", "3": "Happy Easter!", "4": 'The card says "Happy Easter".'},
    )
    assert [r["extracted"] for r in records] == ["a", "b", "b", "a"]
    assert metrics["pair_accuracy"] == 100.0 and metrics["unparsed"] == 0
    _, records = bench.score(items[2:3], {"3": "happy easter"})  # no "!": option (a), exactly
    assert records[0]["extracted"] == "a" and not records[0]["correct"]


# --------------------------------------------------------------------------------------------------
# RefCOCO's published layouts
# --------------------------------------------------------------------------------------------------


def test_refcoco_lmms_lab_rows_as_json_lines(tmp_path):
    root = tmp_path / "RefCOCO"
    _jsonl(root / "data" / "val.jsonl", LMMS_ROWS)
    _image(root / "images" / "COCO_train2014_000000581857.jpg", (100, 80))
    bench = get_benchmark("refcoco")
    items = bench.load(root)
    assert [it.id for it in items] == [
        "refcoco_val_0/0",
        "refcoco_val_0/1",
        "refcoco_val_0/2",
        "refcoco_val_1/0",
        "refcoco_val_1/1",
    ]
    assert items[0].meta["bbox"] == [10.0, 20.0, 40.0, 60.0]  # x, y, w, h -> corners
    assert (items[0].meta["width"], items[0].meta["height"]) == (100, 80)
    assert items[1].prompt.endswith("describes: man on left")
    # [10, 20, 40, 60] of 100x80 is [0.1, 0.25, 0.4, 0.75] in norm1
    metrics, _ = bench.score(items, {"refcoco_val_0/1": "[0.1, 0.25, 0.4, 0.75]"})
    assert metrics["acc@0.5"] == 20.0 and metrics["unparsed"] == 4
    # the same rows under any name: recognised by their columns
    (root / "data" / "val.jsonl").rename(root / "refcocog_umd_val_rows.jsonl")
    assert [it.id for it in bench.load(root, file="refcocog_umd_val_rows.jsonl")] == [it.id for it in items]


def test_refcoco_lmms_lab_parquet_with_embedded_images(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "RefCOCO"
    (root / "data").mkdir(parents=True)
    png = _png_bytes((100, 80))
    rows = [{**r, "image": {"bytes": png, "path": None}} for r in LMMS_ROWS]
    pq.write_table(pa.Table.from_pylist(rows[:1]), root / "data" / "val-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1:]), root / "data" / "val-00001-of-00002.parquet")
    bench = get_benchmark("refcoco")
    items = bench.load(root)
    assert len(items) == 5 and items[3].meta["bbox"] == [60.0, 10.0, 90.0, 50.0]
    written = root / "images" / "COCO_train2014_000000581857.jpg"
    assert written.read_bytes() == png and items[0].image == written.resolve()
    assert (items[0].meta["width"], items[0].meta["height"]) == (100, 80)
    # lmms-eval's --log_samples of that task: one sample per sentence, doc without its image columns
    samples = []
    for doc_id, it in enumerate(items):
        doc = {
            k: v for k, v in LMMS_ROWS[0 if it.id.startswith("refcoco_val_0") else 1].items() if k != "answer"
        }
        doc.update(answer=it.meta["sentence"], bbox=[v / 100 for v in it.meta["bbox"]])
        samples.append(
            {
                "doc_id": doc_id,
                "doc": doc,
                "target": "bbox",
                "arguments": [{"until": ["ASSISTANT:"]}],
                "resps": [["[0.1, 0.25, 0.4, 0.75]"]],
                "filtered_resps": ["[0.1, 0.25, 0.4, 0.75]"],
                "refcoco_ACC@0.5": {"answer": it.meta["sentence"]},
            }
        )
    preds = _jsonl(tmp_path / "samples_refcoco_bbox_rec_val.jsonl", samples)
    scored = score_predictions_file("refcoco", root, preds)
    assert scored.layout == "lmms-eval" and scored.metrics["acc@0.5"] == 60.0  # the three of row 0
    # a parquet row with a degenerate box is refused, naming the file, the row and its id
    pq.write_table(
        pa.Table.from_pylist([{**rows[0], "bbox": [10.0, 20.0, 0.0, 40.0]}]),
        root / "data" / "val-00001-of-00002.parquet",
    )
    with pytest.raises(
        BenchmarkError, match=r"val-00001-of-00002\.parquet row 1 .*refcoco_val_0.*degenerate"
    ):
        bench.load(root)


def test_refcoco_degenerate_box_in_every_layout(tmp_path):
    root = tmp_path / "lmms"
    _jsonl(root / "val.jsonl", [LMMS_ROWS[0], {**LMMS_ROWS[1], "bbox": [60.0, 10.0, 30.0, 0.0]}])
    _image(root / "images" / "COCO_train2014_000000581857.jpg", (100, 80))
    with pytest.raises(BenchmarkError, match=r"val\.jsonl:2 .*refcoco_val_1.*degenerate bbox") as err:
        get_benchmark("refcoco").load(root)
    assert "\n" not in str(err.value)
    ours = tmp_path / "ours"
    _image(ours / "images" / "a.png", (10, 10))
    _jsonl(
        ours / "refcoco_val.jsonl",
        [{"id": "r0", "image": "a.png", "width": 10, "height": 10, "sentence": "dot", "bbox": [2, 2, 2, 8]}],
    )
    with pytest.raises(BenchmarkError, match=r"refcoco_val\.jsonl:1 \(id r0\).*degenerate"):
        get_benchmark("refcoco").load(ours)


def test_refcoco_refer_layout_and_splits(tmp_path):
    root = _refer(tmp_path / "refcoco")
    bench = get_benchmark("refcoco")
    items = bench.load(root)
    assert [it.id for it in items] == ["0", "1"]  # sent_ids of the val refs
    assert items[0].meta["bbox"] == [10.0, 10.0, 30.0, 50.0] and items[0].prompt.endswith(": the lady")
    test_a = bench.load(root, split="testA")
    assert [it.id for it in test_a] == ["2"] and test_a[0].meta["ref_id"] == 1
    with pytest.raises(BenchmarkError, match=r"no refs in split 'testB'; its splits are \['testA', 'val'\]"):
        bench.load(root, split="testB")
    metrics, _ = bench.score(items, {"0": "[0.1, 0.2, 0.3, 1.0]", "1": "[0.5, 0.5, 0.6, 0.6]"})
    assert metrics["acc@0.5"] == 50.0


def test_refcoco_refer_pickle_asking_for_a_global_is_refused(tmp_path):
    root = _refer(tmp_path / "refcoco")

    # an OrderedDict, not a dict: unpickling it means resolving collections.OrderedDict
    (root / "refs(unc).p").write_bytes(pickle.dumps([collections.OrderedDict(split="val")]))
    with pytest.raises(BenchmarkError, match=r"refs\(unc\)\.p: refused: .*collections\.OrderedDict") as err:
        get_benchmark("refcoco").load(root)
    assert "\n" not in str(err.value)


def test_refcoco_layout_choice(tmp_path):
    root = _refer(tmp_path / "both")
    _jsonl(root / "val.jsonl", LMMS_ROWS)
    with pytest.raises(BenchmarkError, match="several RefCOCO layouts.*layout="):
        get_benchmark("refcoco").load(root)
    assert len(get_benchmark("refcoco").load(root, layout="refer")) == 2
    with pytest.raises(OptionError, match="unknown RefCOCO layout 'coco'"):
        get_benchmark("refcoco").load(root, layout="coco")
    with pytest.raises(FileNotFoundError, match="no files for split 'val'"):
        get_benchmark("refcoco").load(tmp_path / "empty")


# --------------------------------------------------------------------------------------------------
# Other tools' predictions files
# --------------------------------------------------------------------------------------------------


def _llava_answers(path: Path, answers: list[tuple[int, str, str]]) -> Path:
    return _jsonl(
        path,
        [
            {
                "question_id": qid,
                "prompt": prompt,
                "text": text,
                "answer_id": f"HTmsLmn8XkJ2p{qid}",
                "model_id": "llava-v1.5-13b",
                "metadata": {},
            }
            for qid, prompt, text in answers
        ],
    )


def test_llava_answers_for_one_pope_split(tmp_path):
    data = _pope(tmp_path / "pope", splits=("adversarial",))
    preds = _llava_answers(
        tmp_path / "llava-v1.5-13b.jsonl",
        [
            (1, "Is there a snowboard in the image?", "Yes"),
            (2, "Is there a dog in the image?", "No"),
            (3, "Is there a car in the image?", "No"),
            (4, "Is there a zebra in the image?", "No"),
        ],
    )
    scored = score_predictions_file("pope", data, preds)
    assert scored.layout == "llava" and scored.metrics["adversarial"]["accuracy"] == 75.0


def test_llava_answers_for_three_pope_splits_need_the_question_file(tmp_path):
    data = _pope(tmp_path / "pope")
    questions = ["snowboard", "dog", "car", "zebra"]
    # LLaVA's llava_pope_test.jsonl numbers the three splits' questions on, one category each
    qfile = _jsonl(
        tmp_path / "llava_pope_test.jsonl",
        [
            {
                "question_id": 100 * s + i,
                "image": f"COCO_val2014_00000031019{i}.jpg",
                "text": f"Is there a {obj} in the image?\nAnswer the question using a single word or phrase.",
                "category": split,
            }
            for s, split in enumerate(("adversarial", "popular", "random"), 1)
            for i, obj in enumerate(questions, 1)
        ],
    )
    answers = [
        (100 * s + i, f"Is there a {obj} in the image?", "Yes" if s == 1 else "No")
        for s in (1, 2, 3)
        for i, obj in enumerate(questions, 1)
    ]
    preds = _llava_answers(tmp_path / "answers.jsonl", answers)
    with pytest.raises(BenchmarkError, match=r"12 question_id\(s\) not in benchmark 'pope'.*'101'"):
        score_predictions("pope", data, preds, None)  # the integer ids are LLaVA's, not POPE's
    metrics = score_predictions("pope", data, preds, None, questions=str(qfile))
    assert metrics["adversarial"]["yes_ratio"] == 100.0 and metrics["adversarial"]["accuracy"] == 50.0
    assert metrics["random"]["accuracy"] == 50.0 and metrics["random"]["recall"] == 0.0
    # answers of POPE's own numbering, one file for three splits: ambiguous without a split
    bare = _llava_answers(tmp_path / "bare.jsonl", [(1, "Is there a snowboard in the image?", "Yes")])
    with pytest.raises(
        BenchmarkError, match=r"bare\.jsonl:1: question_id '1' names no split and is in adversarial"
    ):
        score_predictions("pope", data, bare, None)
    # a question file out of step with POPE's files is refused, not mis-scored
    shuffled = [json.loads(line) for line in qfile.read_text().splitlines()]
    shuffled[0]["text"], shuffled[1]["text"] = shuffled[1]["text"], shuffled[0]["text"]
    _jsonl(qfile, shuffled)
    with pytest.raises(BenchmarkError, match="do not line up"):
        score_predictions("pope", data, preds, None, questions=str(qfile))


def test_pope_lines_with_a_split_field(tmp_path):
    data = _pope(tmp_path / "pope")
    preds = _jsonl(
        tmp_path / "p.jsonl",
        [
            {"question_id": i, "split": split, "response": "Yes" if i in (1, 3) else "No"}
            for split in ("random", "popular", "adversarial")
            for i in range(1, 5)
        ],
    )
    metrics = score_predictions("pope", data, preds, None)
    assert metrics["mean_f1"] == 100.0


def test_lmms_eval_log_samples_for_pope(tmp_path):
    data = _pope(tmp_path / "pope")
    samples = []
    for split in ("adversarial", "popular", "random"):
        for i, (obj, label) in enumerate(
            [("snowboard", "yes"), ("dog", "no"), ("car", "yes"), ("zebra", "no")], 1
        ):
            doc = {  # lmms-lab/POPE's row as lmms-eval logs it: the image columns are left out
                "id": str(len(samples)),
                "question_id": str(i),
                "question": f"Is there a {obj} in the image?",
                "answer": label,
                "category": split,
            }
            pred = "yes" if split != "random" else "no"
            samples.append(
                {
                    "doc_id": len(samples),
                    "doc": doc,
                    "target": label,
                    "arguments": [{"max_new_tokens": 128, "temperature": 0, "do_sample": False}],
                    "resps": [[pred.capitalize()]],
                    "filtered_resps": [pred.capitalize()],
                    "doc_hash": "5a8c",
                    "prompt_hash": "e3b0",
                    "target_hash": "a1b2",
                    "pope_accuracy": {"question_id": str(i), "score": float(pred == label)},
                }
            )
    preds = _jsonl(tmp_path / "samples_pope.jsonl", samples)
    scored = score_predictions_file("pope", data, preds)
    assert scored.layout == "lmms-eval"
    assert (
        scored.metrics["adversarial"]["yes_ratio"] == 100.0 and scored.metrics["random"]["yes_ratio"] == 0.0
    )
    # an older lmms-eval's <task>.json: one object with the samples under "logs"
    old = tmp_path / "pope.json"
    old.write_text(json.dumps({"args": {"model": "llava"}, "model_configs": {}, "logs": samples}, indent=4))
    assert score_predictions_file("pope", data, old).metrics == scored.metrics
    old.write_text(json.dumps({"args": {"model": "llava"}, "logs": samples}))  # the same on one line
    assert score_predictions_file("pope", data, old).metrics == scored.metrics
    # samples whose question is not POPE's under that id: refused
    samples[0]["doc"]["question"] = "Is there a kite in the image?"
    with pytest.raises(BenchmarkError, match=r"samples_pope\.jsonl:1: .*adversarial/1 asks 'Is there a kite"):
        score_predictions_file("pope", data, _jsonl(preds, samples))


def test_mathverse_files_of_other_tools(tmp_path):
    data = _mathverse(tmp_path / "mv")
    rows = json.loads((data / "testmini.json").read_text())
    text_only = json.loads((data / "testmini_text_only.json").read_text())
    # MathVerse's own output file: the rows with model_answer
    out = tmp_path / "output_testmini.json"
    out.write_text(json.dumps([{**r, "model_answer": "The answer is 720."} for r in rows[:1] + text_only]))
    scored = score_predictions_file("mathverse", data, out)
    assert scored.layout == "mathverse" and scored.metrics["text_only"] == 100.0
    assert scored.metrics["versions"]["Text Lite"] == pytest.approx(100 / 6)
    # lmms-eval samples of mathverse_testmini_text_lite
    samples = [
        {
            "doc_id": n,
            "doc": {**r, "question_for_eval": r["question"]},
            "target": r["answer"],
            "resps": [["720"]],
            "filtered_resps": ["720"],
            "gpt_eval_score": 0,
        }
        for n, r in enumerate(rows[:1])
    ]
    scored = score_predictions_file("mathverse", data, _jsonl(tmp_path / "samples_mathverse.jsonl", samples))
    assert scored.layout == "lmms-eval" and scored.metrics["versions"]["Text Lite"] == pytest.approx(100 / 6)
    # VLMEvalKit's table: index = sample_index, its answer must be ours
    table = [
        {
            "index": r["sample_index"],
            "question": r["question"],
            "answer": r["answer"],
            "question_type": r["question_type"],
            "problem_version": r["problem_version"],
            "metadata": str(r["metadata"]),
            "prediction": "720" if r["sample_index"] == "1" else "",
        }
        for r in rows
    ]
    scored = score_predictions_file("mathverse", data, _tsv(tmp_path / "Model_MathVerse_MINI.tsv", table))
    assert scored.layout == "vlmevalkit" and scored.metrics["versions"]["Text Lite"] == pytest.approx(100 / 6)
    table[1]["answer"] = "114"
    with pytest.raises(BenchmarkError, match=r"\.tsv:3: VLMEvalKit's row 2 has answer '114'"):
        score_predictions_file("mathverse", data, _tsv(tmp_path / "Model_MathVerse_MINI.tsv", table))


def test_mmvp_files_of_other_tools(tmp_path):
    data = _mmvp(tmp_path / "mmvp")
    # MMVP's own scripts/evaluate_mllm.py: question_id = Index, "response"
    rows = [
        {"question_id": i, "prompt": "...", "answer": a, "response": r, "answer_id": "x", "model_id": "llava"}
        for i, a, r in [
            (1, "(a)", "(a) Open"),
            (2, "(b)", "Closed"),
            (3, "(b)", "Happy Easter!"),
            (4, "(a)", "(b)"),
        ]
    ]
    scored = score_predictions_file("mmvp", data, _jsonl(tmp_path / "answer.jsonl", rows))
    assert scored.layout == "llava" and scored.metrics["pair_accuracy"] == 50.0
    # VLMEvalKit's MMVP table, numbered from 0
    table = [
        {"index": str(i), "question": "q", "A": "Open", "B": "Closed", "answer": "A", "prediction": p}
        for i, p in enumerate(["A", "B", "B", "A"])
    ]
    scored = score_predictions_file("mmvp", data, _tsv(tmp_path / "Model_MMVP.tsv", table))
    assert scored.layout == "vlmevalkit" and scored.metrics["question_accuracy"] == 100.0


def test_vlmevalkit_xlsx(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    data = _mmvp(tmp_path / "mmvp")
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["index", "question", "A", "B", "answer", "prediction"])
    for i, p in enumerate(["A", "A", "B", "A"]):
        sheet.append([i, "q", "Open", "Closed", "A", p])
    book.save(tmp_path / "Model_MMVP.xlsx")
    scored = score_predictions_file("mmvp", data, tmp_path / "Model_MMVP.xlsx")
    assert scored.layout == "vlmevalkit" and scored.metrics["question_accuracy"] == 75.0


def test_bad_predictions_files_are_one_line_errors(tmp_path):
    data = _pope(tmp_path / "pope")
    unknown = _jsonl(tmp_path / "unknown.jsonl", [{"qid": 1, "answer": "yes"}])
    with pytest.raises(BenchmarkError) as err:
        score_predictions("pope", data, unknown, None)
    message = str(err.value)
    assert message.startswith(f"{unknown}:1: ") and "\n" not in message
    assert all(name in message for name in PREDICTION_LAYOUTS)  # the accepted layouts are listed
    half = tmp_path / "half.jsonl"
    half.write_text(
        json.dumps({"question_id": "random/1", "response": "Yes"})
        + "\n"
        + '{"question_id": "random/2", "resp\n'
    )
    with pytest.raises(BenchmarkError, match=r"half\.jsonl:2: not valid JSON"):
        score_predictions("pope", data, half, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()  # nothing scored from a half-read file
    mixed = _jsonl(
        tmp_path / "mixed.jsonl",
        [{"question_id": "random/1", "response": "Yes"}, {"doc_id": 3, "doc": {}, "filtered_resps": ["No"]}],
    )
    with pytest.raises(
        BenchmarkError, match=r"mixed\.jsonl:2: missing field\(s\) \['question_id', 'response'\]"
    ):
        score_predictions("pope", data, mixed, None)
    ghost = _jsonl(tmp_path / "ghost.jsonl", [{"question_id": "random/9", "response": "Yes"}])
    with pytest.raises(
        BenchmarkError, match=r"ghost\.jsonl: 1 question_id\(s\) not in benchmark 'pope'.*'random/9'"
    ):
        score_predictions("pope", data, ghost, None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(BenchmarkError, match=r"empty\.jsonl: no predictions"):
        score_predictions("pope", data, empty, None)
    no_xlsx_reader = tmp_path / "table.xlsx"
    no_xlsx_reader.write_bytes(b"not a zip")
    with pytest.raises(BenchmarkError, match=r"table\.xlsx: "):
        score_predictions("pope", data, no_xlsx_reader, None)


# --------------------------------------------------------------------------------------------------
# rule=official, recorded and reported
# --------------------------------------------------------------------------------------------------


def test_pope_official_rule_reads_an_empty_answer_as_yes(tmp_path):
    data = _pope(tmp_path / "pope", splits=("random",))
    preds = _jsonl(
        tmp_path / "p.jsonl",
        [{"question_id": f"random/{i}", "response": r} for i, r in enumerate(["", "No", "", "No."], 1)],
    )
    ours = score_predictions("pope", data, preds, tmp_path / "ours.json")
    official = score_predictions("pope", data, preds, tmp_path / "official.json", rule="official")
    assert ours["random"]["unparsed"] == 2 and ours["random"]["accuracy"] == 50.0
    assert official["random"]["unparsed"] == 0 and official["random"]["accuracy"] == 100.0
    assert json.loads((tmp_path / "official.json").read_text())["meta"]["rule"] == "official"
    assert json.loads((tmp_path / "ours.json").read_text())["meta"]["rule"] == "mllm"
    table = render(load_results([tmp_path / "ours.json", tmp_path / "official.json"]))
    assert "[rule: official]" in table and "POPE mean F1: mllm, official" in table


def test_refcoco_official_rule_is_lmms_evals_scorer(tmp_path):
    root = tmp_path / "ref"
    _image(root / "images" / "wide.png", (100, 50))
    _jsonl(
        root / "refcoco_val.jsonl",
        [
            {
                "id": f"r{i}",
                "image": "wide.png",
                "width": 100,
                "height": 50,
                "sentence": "red",
                "bbox": [10, 10, 30, 30],
            }
            for i in range(4)
        ],
    )
    responses = {
        "r0": "[0.1, 0.2, 0.3, 0.6]",  # exact, in brackets: both rules agree
        "r1": "(0.1, 0.2, 0.3, 0.6)",  # parentheses: lmms-eval finds no box
        "r2": "[0.3, 0.6, 0.1, 0.2]",  # reversed corners: lmms-eval's IoU is 0
        "r3": "[0.1, 0.2, 0.3, 1.4]",  # runs off the image: we clip, lmms-eval does not
    }
    preds = _jsonl(tmp_path / "p.jsonl", [{"id": k, "response": v} for k, v in responses.items()])
    ours = score_predictions("refcoco", root, preds, None)
    official = score_predictions("refcoco", root, preds, tmp_path / "o.json", rule="official")
    assert ours["acc@0.5"] == 100.0 and ours["unparsed"] == 0
    assert official["acc@0.5"] == 25.0 and official["unparsed"] == 1
    assert official["miou"] == pytest.approx(100 * (1 + 0 + 0 + 20 / 60) / 4)  # r3: 20x20 over 20x60
    with pytest.raises(OptionError, match="box_format=norm1"):
        score_predictions("refcoco", root, preds, None, rule="official", box_format="norm1000")


# --------------------------------------------------------------------------------------------------
# The command line: one line per bad input, the layout it read
# --------------------------------------------------------------------------------------------------


def test_cli_one_line_errors_and_the_layout_it_read(tmp_path, capsys):
    data = _pope(tmp_path / "pope", splits=("adversarial",))
    preds = _llava_answers(tmp_path / "answers.jsonl", [(1, "Is there a snowboard in the image?", "Yes")])
    base = [
        "eval",
        "pope",
        "--predictions",
        str(preds),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "m.json"),
    ]
    assert cli_main(base) == 0
    out = capsys.readouterr().out
    assert f"predictions: {preds} read as llava" in out and "rule: mllm" in out
    for extra, words in [
        (["--option", "nonsense=1"], "has no option(s) ['nonsense']"),
        (["--option", "rule=lenient"], "has no rule 'lenient'"),
    ]:
        assert cli_main(base + extra) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    mmvp = ["eval", "mmvp", "--predictions", str(preds), "--data", str(_mmvp(tmp_path / "mmvp"))]
    assert cli_main(mmvp + ["--out", str(tmp_path / "x.json"), "--option", "rule=official"]) == 2
    err = capsys.readouterr().err
    assert "GPT-4" in err and len(err.strip().splitlines()) == 1
    unknown = _jsonl(tmp_path / "unknown.jsonl", [{"qid": 1, "answer": "yes"}])
    assert (
        cli_main(
            [
                "eval",
                "pope",
                "--predictions",
                str(unknown),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "y.json"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert str(unknown) in err and "accepted: mllm" in err and len(err.strip().splitlines()) == 1


def test_eval_refuses_an_out_that_would_overwrite_its_inputs(tmp_path, capsys):
    """`--predictions p.jsonl --out p.json` writes its records to p.jsonl: the predictions would be
    replaced by the report of them. Refused before anything is written; the inputs are byte for byte as
    they were, and an --out beside them works."""
    data = _mmvp(tmp_path / "mmvp")
    preds = _jsonl(tmp_path / "p.jsonl", [{"Index": i, "response": "(a)"} for i in "1234"])
    before = preds.read_bytes(), (data / "Questions.csv").read_bytes()
    mmvp = ["eval", "mmvp", "--predictions", str(preds), "--data", str(data)]
    for out in (tmp_path / "p.json", tmp_path / "p"):
        assert cli_main(mmvp + ["--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "choose an --out outside the inputs" in err and str(out) in err
    assert (preds.read_bytes(), (data / "Questions.csv").read_bytes()) == before
    # POPE's questions are .json files: an --out named like one of them would replace it
    pope = _pope(tmp_path / "pope")
    split = pope / "coco_pope_random.json"
    kept = split.read_bytes()
    pope_preds = _jsonl(tmp_path / "pp.jsonl", [{"question_id": i, "response": "yes"} for i in range(1, 5)])
    assert (
        cli_main(["eval", "pope", "--predictions", str(pope_preds), "--data", str(pope), "--out", str(split)])
        == 2
    )
    assert "a file of the input folder" in capsys.readouterr().err and split.read_bytes() == kept
    assert not (tmp_path / "p.json").exists()
    assert cli_main(mmvp + ["--out", str(tmp_path / "scored.json")]) == 0
    assert len((tmp_path / "scored.jsonl").read_text().splitlines()) == 4
    assert preds.read_bytes() == before[0]
