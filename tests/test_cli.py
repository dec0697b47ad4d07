"""The command line end to end: `mllm demo --quick`, then chat and eval on what it made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def mllm(*args: str, stdin: str | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MLLM_FAULT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "mllm.cli", *args], input=stdin, env=env, capture_output=True,
                          text=True, timeout=timeout)


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
    assert set(res["wall_s"]) >= {"synth", "lm_pretrain", "align", "instruct", "eval"}
    assert 0.0 <= res["qa_accuracy"] <= 100.0
    assert "mllm chat --model" in r.stdout
    assert (out / "run" / "instruct" / "final" / "mllm.json").is_file()
    assert len((out / "qa_records.jsonl").read_text().splitlines()) == res["qa_n"]


def test_chat_once_and_interactive(demo):
    out, _ = demo
    image = next((out / "world" / "eval" / "images").glob("*.png"))
    once = mllm("chat", "--model", str(out / "run"), "--image", str(image), "--prompt", "What color is the circle?",
                "--max-new-tokens", "8")
    assert once.returncode == 0, once.stderr[-3000:]
    assert once.stdout.strip() != "" or once.stdout == "\n"
    script = f"/image {image}\nWhat shape is it?\n/reset\n/image /no/such/file.png\n/bogus\n/quit\n"
    chat = mllm("chat", "--model", str(out / "run"), "--max-new-tokens", "8", stdin=script)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert "attached" in chat.stdout and "conversation cleared" in chat.stdout
    assert "image file not found" in chat.stdout and "unknown command" in chat.stdout


def test_eval_cli_and_bad_model_dir(demo, tmp_path):
    out, _ = demo
    r = mllm("eval", "mmvp", "--model", str(out / "run"), "--data", str(out / "world" / "mmvp"), "--out",
             str(tmp_path / "mmvp.json"))
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
