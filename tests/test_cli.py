"""The command line end to end: `mllm demo --quick`, then chat and eval on what it made."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import subprocess_env

REPO = Path(__file__).resolve().parents[1]


def mllm(*args: str, stdin: str | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mllm.cli", *args],
        input=stdin,
        env=subprocess_env(REPO),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    r = mllm("demo", "--quick", "--out", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return out, r


def test_demo_quick_writes_results(demo):
    out, r = demo
    res = json.loads((out / "results.json").read_text())
    for key in ("qa_accuracy", "mmvp_pair_accuracy", "mmvp_question_accuracy", "wall_s", "qa_per_category"):
        assert key in res
    assert set(res["wall_s"]) >= {
        "synth",
        "encoder",
        "lm_pretrain",
        "tower_warmup",
        "align",
        "instruct",
        "eval",
    }
    assert set(res["pope_accuracy"]) == {"random", "popular", "adversarial"} and "pope_mean_f1" in res
    assert res["seed"] == 0 and (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "run" / "instruct" / "evals.jsonl").is_file()  # the learning curve's points
    assert 0.0 <= res["qa_accuracy"] <= 100.0
    assert set(res["encoder_retrieval"]) == {"mean_R@1", "mean_R@5"}
    # the MLLM's tower started as the contrastive encoder's image tower
    recipe = (out / "run" / "recipe.yaml").read_text()
    assert str(out / "encoder" / "contrastive" / "final" / "image_tower") in recipe
    assert "mllm chat --model" in r.stdout
    assert (out / "run" / "instruct" / "final" / "mllm.json").is_file()
    assert len((out / "qa_records.jsonl").read_text().splitlines()) == res["qa_n"]


def test_demo_seed_must_be_an_integer(tmp_path):
    r = mllm("demo", "--quick", "--seed", "zero", "--out", str(tmp_path / "d"))
    assert r.returncode == 2 and "--seed: invalid int value: 'zero'" in r.stderr
    assert not (tmp_path / "d").exists()  # nothing half-written


def test_chat_once_and_interactive(demo):
    out, _ = demo
    image = next((out / "world" / "eval" / "images").glob("*.png"))
    once = mllm(
        "chat",
        "--model",
        str(out / "run"),
        "--image",
        str(image),
        "--prompt",
        "What color is the circle?",
        "--max-new-tokens",
        "8",
    )
    assert once.returncode == 0, once.stderr[-3000:]
    assert once.stdout.strip() != "" or once.stdout == "\n"
    script = f"/image {image}\nWhat shape is it?\n/reset\n/image /no/such/file.png\n/bogus\n/quit\n"
    chat = mllm("chat", "--model", str(out / "run"), "--max-new-tokens", "8", stdin=script)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert "attached" in chat.stdout and "conversation cleared" in chat.stdout
    assert "image file not found" in chat.stdout and "unknown command" in chat.stdout


def test_eval_cli_and_bad_model_dir(demo, tmp_path):
    out, _ = demo
    r = mllm(
        "eval",
        "mmvp",
        "--model",
        str(out / "run"),
        "--data",
        str(out / "world" / "mmvp"),
        "--out",
        str(tmp_path / "mmvp.json"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "mmvp.json").read_text())
    assert {"pair_accuracy", "question_accuracy"} <= set(metrics)
    assert len((tmp_path / "mmvp.jsonl").read_text().splitlines()) == 16
    bad = mllm("chat", "--model", str(tmp_path), "--prompt", "hi")
    assert bad.returncode == 2 and "neither a model folder" in bad.stderr


def test_synth_cli(tmp_path):
    r = mllm("synth", "--out", str(tmp_path / "w"), "--seed", "3", "--n", "20", "--size", "64")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "w" / "manifest.json").read_text())["n"] == 20
    assert len(json.loads((tmp_path / "w" / "instruct.json").read_text())) == 20


@pytest.mark.parametrize(
    "bench,sub,n,keys",
    [
        ("mmvp", "mmvp", 16, {"pair_accuracy", "question_accuracy"}),
        ("pope", "pope", 72, {"random", "popular", "adversarial", "mean_f1"}),
        ("mathverse", "mathverse", 24, {"all", "versions", "text_only"}),
        ("refcoco", "refcoco", 16, {"acc@0.5", "acc@0.25", "acc@0.75", "miou", "unparsed"}),
        ("qa", "", 64, {"accuracy", "per_category"}),
    ],
)
def test_every_evaluator_end_to_end(demo, tmp_path, bench, sub, n, keys):
    out, _ = demo
    data = out / "world" / sub if sub else out / "world"
    r = mllm(
        "eval",
        bench,
        "--model",
        str(out / "run"),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "m.json"),
        "--max-new-tokens",
        "12",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert keys <= set(metrics) and metrics["meta"]["benchmark"] == bench
    records = [json.loads(ln) for ln in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert len(records) == n and all("response" in rec for rec in records)
    # The same responses, scored from a predictions file, give the same metrics.
    id_key = {"mmvp": "Index", "pope": "question_id", "mathverse": "sample_index"}.get(bench, "id")
    preds = tmp_path / "preds.jsonl"
    preds.write_text(
        "".join(json.dumps({id_key: rec["id"], "response": rec["response"]}) + "\n" for rec in records)
    )
    r2 = mllm(
        "eval", bench, "--predictions", str(preds), "--data", str(data), "--out", str(tmp_path / "p.json")
    )
    assert r2.returncode == 0, r2.stderr[-3000:]
    again = json.loads((tmp_path / "p.json").read_text())
    assert {k: v for k, v in again.items() if k != "meta"} == {
        k: v for k, v in metrics.items() if k != "meta"
    }


def test_agla_on_pope_and_report(demo, tmp_path):
    out, _ = demo
    for dec in ("greedy", "agla"):
        r = mllm(
            "eval",
            "pope",
            "--model",
            str(out / "run"),
            "--data",
            str(out / "world" / "pope"),
            "--out",
            str(tmp_path / f"pope-{dec}.json"),
            "--decoding",
            dec,
            "--max-new-tokens",
            "4",
        )
        assert r.returncode == 0, r.stderr[-3000:]
    rep = mllm(
        "report",
        str(tmp_path / "pope-greedy.json"),
        str(tmp_path / "pope-agla.json"),
        "--out",
        str(tmp_path / "r.md"),
    )
    assert rep.returncode == 0, rep.stderr[-2000:]
    text = (tmp_path / "r.md").read_text()
    assert "POPE mean F1" in text and "[agla: alpha=2.0, beta=0.5, keep_ratio=0.5]" in text
    assert "LLaVA-1.5-7B (published)" in text


def test_eval_refuses_unknown_prediction_ids(demo, tmp_path):
    out, _ = demo
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"Index": "9999", "response": "(a)"}) + "\n")
    r = mllm(
        "eval",
        "mmvp",
        "--predictions",
        str(preds),
        "--data",
        str(out / "world" / "mmvp"),
        "--out",
        str(tmp_path / "x.json"),
    )
    assert r.returncode == 2 and "9999" in r.stderr
