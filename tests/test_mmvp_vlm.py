"""MMVP-VLM and zero-shot retrieval: GeoWorld's sets, the scorers against hand-made similarities, `mllm eval`."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import TINY_TOWER

from mllm.data.geoworld import write_world
from mllm.data.geoworld.mmvp import PATTERNS
from mllm.evaluation.benchmarks import BenchmarkError, Item, get_benchmark, score_file
from mllm.evaluation.benchmarks.mmvp_vlm import pick
from mllm.evaluation.benchmarks.retrieval import rankings

TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=96,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("geoworld")
    write_world(
        out,
        seed=5,
        n=20,
        size=48,
        n_eval=16,
        mmvp_pairs=8,
        pope_questions=6,
        refcoco_n=4,
        mathverse_problems=1,
        mmvp_vlm_pairs=3,
    )
    return out


@pytest.fixture(scope="module")
def encoder(world, tmp_path_factory):
    """An untrained tiny ContrastiveModel saved to disk (the eval path does not care how good it is)."""
    from encoders.contrastive import ContrastiveModel, EncoderConfig
    from encoders.text_tower import TextTowerConfig, build_text_tower
    from encoders.towers import TowerConfig, build_tower
    from mllm.tokenizer import train_tokenizer

    rows = [json.loads(ln) for ln in (world / "captions.jsonl").read_text().splitlines()]
    tok = train_tokenizer([r["long"] for r in rows], 300)
    torch.manual_seed(0)
    cfg = EncoderConfig(objective="clip", embed_dim=16, text=TextTowerConfig(config=TINY_TEXT, max_length=96))
    model = ContrastiveModel(
        build_tower(TowerConfig(type="clip", config=TINY_TOWER)), build_text_tower(cfg.text, tok), cfg
    )
    out = tmp_path_factory.mktemp("enc") / "model"
    model.save_pretrained(out)
    return out


def _items(pattern_of_pair: list[str]) -> list[Item]:
    items = []
    for p, pattern in enumerate(pattern_of_pair):
        for j in (1, 2):
            qid = 2 * p + j
            items.append(
                Item(
                    str(qid),
                    f"s{qid}",
                    None,
                    {"pattern": pattern, "pair": p + 1, "truth": "img1" if qid % 2 else "img2"},
                )
            )
    return items


# --------------------------------------------------------------------------------------- GeoWorld's set


def test_geoworld_writes_the_official_layout(world):
    root = world / "mmvp_vlm"
    with open(root / "Questions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Question ID", "Type", "Statement"]
    rows = rows[1:]
    assert len(rows) == 2 * 3 * len(PATTERNS)
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
    for r in rows:
        assert (root / "MLLM_VLM Images" / r[1] / f"{r[0]}.jpg").is_file()
    scenes = [json.loads(ln) for ln in (root / "scenes.jsonl").read_text().splitlines()]
    for a, b in zip(scenes[::2], scenes[1::2]):
        assert a["pattern"] == b["pattern"] and a["statement"] != b["statement"]
        sa, sb = a["scene"]["shapes"], b["scene"]["shapes"]
        if a["pattern"] in ("color", "size", "shape", "orientation"):
            key = {"color": "color", "size": "size", "shape": "kind", "orientation": "orientation"}[
                a["pattern"]
            ]
            assert sa[0][key] != sb[0][key] and sa[1:] == sb[1:]
            assert sa[0][key] in a["statement"] and sb[0][key] in b["statement"]
        if a["pattern"] == "count":
            assert abs(len(sa) - len(sb)) == 1
    assert len(get_benchmark("mmvp_vlm").load(root)) == len(rows)


def test_load_checks_the_files(world, tmp_path):
    import shutil

    root = tmp_path / "v"
    shutil.copytree(world / "mmvp_vlm", root)
    text = (root / "Questions.csv").read_text().splitlines()
    (root / "Questions.csv").write_text("\n".join(text[:-1]) + "\n")
    with pytest.raises(BenchmarkError, match="even number"):
        get_benchmark("mmvp_vlm").load(root)
    (root / "Questions.csv").write_text("\n".join(text) + "\n")
    first = text[1].split(",")
    (root / "MLLM_VLM Images" / first[1] / f"{first[0]}.jpg").unlink()
    with pytest.raises(BenchmarkError, match=r"Questions.csv:2 \(qid 1\).*not found"):
        get_benchmark("mmvp_vlm").load(root)


# --------------------------------------------------------------------------------------- MMVP-VLM scoring


def test_pick_follows_the_official_rule():
    # pair 1: both statements prefer their own image; pair 2: both prefer image 1; pair 3: a tie -> img2
    logits = torch.tensor([[[3.0, 1.0], [0.5, 2.0]], [[2.0, 1.0], [2.0, 1.5]], [[1.0, 1.0], [0.0, 4.0]]])
    got = pick(logits)
    assert [p for p, _ in got] == ["img1", "img2", "img1", "img1", "img2", "img2"]
    assert got[0][1] == pytest.approx(torch.tensor([3.0, 1.0]).softmax(0)[0].item())
    with pytest.raises(ValueError):
        pick(torch.zeros(2, 3, 2))


def test_a_pair_counts_only_when_both_statements_are_right():
    items = _items(["color", "color", "count", "count"])
    responses = {
        "1": "img1",
        "2": "img2",  # color pair 1 right
        "3": "img1",
        "4": "img1",  # color pair 2: second statement wrong
        "5": "IMG1",
        "6": " img2",  # count pair 1 right (case and space blind)
        "7": "img2",
        "8": "img1",
    }  # count pair 2: both wrong
    metrics, records = get_benchmark("mmvp_vlm").score(items, responses)
    assert metrics["patterns"] == {"color": 50.0, "count": 50.0}
    assert metrics["average"] == 50.0 and metrics["pairs"] == 4
    assert metrics["statement_accuracy"] == pytest.approx(100 * 5 / 8)
    del responses["2"]
    metrics, records = get_benchmark("mmvp_vlm").score(items, responses)
    assert metrics["patterns"]["color"] == 0.0 and [r for r in records if r["id"] == "2"][0]["missing"]
    metrics, _ = get_benchmark("mmvp_vlm").score(items, {"1": "first", "2": "img2"})
    assert metrics["average"] == 0.0


def test_average_is_the_mean_over_patterns():
    items = _items(["a", "b", "b", "b"])
    responses = {str(q): ("img1" if q % 2 else "img2") for q in range(1, 9)}
    responses["8"] = "img1"  # one b pair wrong
    metrics, _ = get_benchmark("mmvp_vlm").score(items, responses)
    assert metrics["patterns"] == {"a": 100.0, "b": pytest.approx(200 / 3)}
    assert metrics["average"] == pytest.approx((100 + 200 / 3) / 2)


# --------------------------------------------------------------------------------------- retrieval


def test_rankings_and_recall_from_a_hand_made_similarity_matrix():
    keys = ["a", "b", "c", "d", "e", "f"]
    sim = torch.eye(6)
    sim[1, 1], sim[1, 2] = 0.2, 0.9  # image b ranks caption c first, b second
    sim[3, 3] = -1.0  # image d ranks its caption last
    ranked = rankings(sim, keys, k=5)
    assert ranked["i2t"][0][0] == "a" and ranked["i2t"][1][:2] == ["c", "b"] and "d" not in ranked["i2t"][3]
    assert ranked["t2i"][2][:2] == ["c", "b"]  # caption c: image c (1.0), then image b (0.9)
    items = [
        Item(f"{d}/{k}", k, None, {"direction": d, "key": k, "text": f"text {k}"})
        for d in ("i2t", "t2i")
        for k in keys
    ]
    responses = {f"{d}/{k}": ",".join(r) for d in ("i2t", "t2i") for k, r in zip(keys, ranked[d])}
    metrics, _ = get_benchmark("retrieval").score(items, responses)
    # i2t: a,c,e,f right at rank 1; b at rank 2; d beyond 5 -> R@1 4/6, R@5 5/6
    assert metrics["i2t_R@1"] == pytest.approx(400 / 6) and metrics["i2t_R@5"] == pytest.approx(500 / 6)
    # t2i: caption d's own image scores -1 (last) -> missing from the top 5; caption c: image c (1.0) first
    assert metrics["t2i_R@1"] == pytest.approx(500 / 6) and metrics["t2i_R@5"] == pytest.approx(500 / 6)
    assert metrics["mean_R@1"] == pytest.approx(450 / 6)


def test_identical_captions_count_as_right():
    items = [
        Item(f"{d}/{k}", "", None, {"direction": d, "key": k, "text": t})
        for d in ("i2t", "t2i")
        for k, t in (("x", "same"), ("y", "same"), ("z", "other"))
    ]
    responses = {
        "i2t/x": "y,x,z",
        "i2t/y": "x,y,z",
        "i2t/z": "x,y,z",
        "t2i/x": "y",
        "t2i/y": "y",
        "t2i/z": "z",
    }
    metrics, _ = get_benchmark("retrieval").score(items, responses)
    assert metrics["i2t_R@1"] == pytest.approx(200 / 3) and metrics["t2i_R@1"] == 100.0


# --------------------------------------------------------------------------------------- `mllm eval`


def test_mllm_eval_on_a_contrastive_model(world, encoder, tmp_path):
    from mllm.cli import main

    for bench, data in (("mmvp_vlm", world / "mmvp_vlm"), ("retrieval", world)):
        out = tmp_path / f"{bench}.json"
        assert main(["eval", bench, "--model", str(encoder), "--data", str(data), "--out", str(out)]) == 0
        metrics = json.loads(out.read_text())
        assert metrics["meta"]["model_kind"] == "contrastive"
        records = [json.loads(ln) for ln in out.with_suffix(".jsonl").read_text().splitlines()]
        preds = tmp_path / f"{bench}.preds.jsonl"
        key = "qid" if bench == "mmvp_vlm" else "id"
        preds.write_text(
            "".join(json.dumps({key: r["id"], "response": r["response"]}) + "\n" for r in records)
        )
        again, _ = score_file(bench, data, preds)
        assert again == {k: v for k, v in metrics.items() if k != "meta"}
    assert set(json.loads((tmp_path / "mmvp_vlm.json").read_text())["patterns"]) == set(PATTERNS)
    ret = json.loads((tmp_path / "retrieval.json").read_text())
    assert ret["queries"] == {"i2t": 16, "t2i": 16} and 0 <= ret["i2t_R@1"] <= ret["i2t_R@5"] <= 100
    # an mllm-only benchmark still refuses a contrastive folder with a clear error
    assert (
        main(["eval", "qa", "--model", str(encoder), "--data", str(world), "--out", str(tmp_path / "q.json")])
        == 2
    )
