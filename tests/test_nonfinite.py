"""Numerical faults: a NaN loss injected at a known step (`MLLM_FAULT=nan_loss:N`), under both policies.

`skip` must drop exactly that optimiser step (weights and optimiser state unchanged across it), count
it, and give up past `max_skips`; `stop` must leave a checkpoint of the last good state and a clear
error, and a resume from that checkpoint must reproduce the uninterrupted run.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_recipe, write_tiny_world
from safetensors.torch import load_file
from test_faults import _text_records, run_in_child

from mllm.config import recipe_from_dict
from mllm.training.checkpoint import CheckpointManager
from mllm.training.nonfinite import NonfiniteError
from mllm.training.runner import build_model, train_recipe

REPO = Path(__file__).resolve().parents[1]
STEPS = 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    world = write_tiny_world(root / "world", n=8)
    text = root / "text.json"
    text.write_text(json.dumps(_text_records()))
    base = root / "base"
    build_model(recipe_from_dict(tiny_recipe(world)).model, root / "tok", [text], seed=0).save_pretrained(
        base
    )
    return world, text, base


def _recipe(data, backend="torch", policy="skip", max_skips=10, every=1) -> dict:
    world, text, base = data
    zero = str(REPO / "train/ds/zero2.json") if backend == "deepspeed" else None
    rec = tiny_recipe(world, backend, zero, steps=(1, STEPS), checkpoint_every=every)
    rec["stages"] = [
        dict(
            rec["stages"][1],
            name="s",
            kind="lm_pretrain",
            data={"json": str(text)},
            grad_accum=2,
            batch_size=4,
        )
    ]
    rec["model"]["init_from"] = str(base)
    rec["engine"].update(keep_last=STEPS + 1, threads=1, nonfinite={"policy": policy, "max_skips": max_skips})
    return rec


def _train(rec: dict, out: Path):
    return train_recipe(recipe_from_dict(rec), out, log=lambda *a: None)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "s" / "metrics.jsonl").read_text().splitlines()]


def _ckpt(out: Path, step: int) -> Path:
    return out / "s" / "checkpoints" / f"step-{step:08d}"


def _same_tensors(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_skip_drops_exactly_the_bad_step(data, tmp_path, monkeypatch):
    monkeypatch.setenv("MLLM_FAULT", "nan_loss:3")
    summary = _train(_recipe(data), tmp_path / "run")
    m = _metrics(tmp_path / "run")
    assert [r["step"] for r in m] == list(range(1, STEPS + 1))
    assert m[2]["loss"] is None and m[2]["skipped"] == "non-finite loss"
    assert all(r["loss"] is not None and "skipped" not in r for i, r in enumerate(m) if i != 2)
    assert summary["stages"]["s"]["steps"] == STEPS
    state = json.loads((_ckpt(tmp_path / "run", 3) / "trainer_state.json").read_text())
    assert state["nonfinite_skips"] == [3]
    w = {s: load_file(str(_ckpt(tmp_path / "run", s) / "trainable.safetensors")) for s in (2, 3, 4)}
    assert _same_tensors(w[2], w[3]), "the skipped step changed the weights"
    assert not _same_tensors(w[3], w[4]), "the step after the skipped one did not train"
    opt = {s: torch.load(_ckpt(tmp_path / "run", s) / "optimizer.pt", weights_only=True) for s in (2, 3)}
    assert all(
        torch.equal(opt[2]["state"][k]["exp_avg"], opt[3]["state"][k]["exp_avg"]) for k in opt[2]["state"]
    )
    sched = [
        json.loads((_ckpt(tmp_path / "run", s) / "scheduler.json").read_text())["last_epoch"] for s in (2, 3)
    ]
    assert sched[0] == sched[1], "the schedule advanced on a skipped step"


def test_skip_gives_up_past_max_skips(data, tmp_path, monkeypatch):
    monkeypatch.setenv("MLLM_FAULT", "nan_loss:2,nan_loss:4")
    with pytest.raises(NonfiniteError, match=r"2 steps skipped .*max_skips=1"):
        _train(_recipe(data, max_skips=1), tmp_path / "run")
    m = _metrics(tmp_path / "run")
    assert [r.get("skipped") for r in m] == [None, "non-finite loss", None]


def test_skip_count_survives_resume(data, tmp_path, monkeypatch):
    rec = _recipe(data, max_skips=1)
    monkeypatch.setenv("MLLM_FAULT", "nan_loss:2")
    rec["stages"][0]["max_steps"] = 3
    _train(rec, tmp_path / "run")  # finishes at step 3 with one skip
    rec["stages"][0]["max_steps"] = STEPS
    (tmp_path / "run" / "s" / "final" / "mllm.json").unlink()  # make the stage run on
    monkeypatch.setenv("MLLM_FAULT", "nan_loss:4")
    with pytest.raises(NonfiniteError, match="max_skips=1"):
        _train(rec, tmp_path / "run")


def test_stop_checkpoints_the_last_good_state_and_resumes_exactly(data, tmp_path, monkeypatch):
    rec = _recipe(data, policy="stop", every=0)  # no periodic checkpoints: the one found is stop's
    ref = tmp_path / "ref"
    _train(rec, ref)
    monkeypatch.setenv("MLLM_FAULT", "nan_loss:4")
    with pytest.raises(NonfiniteError) as e:
        _train(rec, tmp_path / "run")
    msg = str(e.value)
    assert "non-finite loss nan at step 4" in msg and "step-00000003" in msg and "policy=skip" in msg
    assert CheckpointManager(tmp_path / "run" / "s" / "checkpoints").latest().name == "step-00000003"
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1, 2, 3]
    monkeypatch.delenv("MLLM_FAULT")
    summary = _train(rec, tmp_path / "run")
    assert summary["stages"]["s"]["resumed_from"] == 3
    assert [r["loss"] for r in _metrics(tmp_path / "run")] == [r["loss"] for r in _metrics(ref)]


def test_policy_is_validated(data, tmp_path):
    with pytest.raises(ValueError, match="nonfinite.policy"):
        _train(_recipe(data, policy="ignore"), tmp_path / "run")


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_deepspeed_zero2(data, tmp_path, policy):
    """Under DeepSpeed the skip is DeepSpeed's own overflow drop, which the engine verifies."""
    rec = _recipe(data, backend="deepspeed", policy=policy)
    out, log = tmp_path / "run", tmp_path / "log.txt"
    code = run_in_child(functools.partial(_train, rec, out), log, fault="nan_loss:3")
    text = log.read_text()
    m = _metrics(out)
    if policy == "skip":
        assert code == 0, text[-3000:]
        assert m[2]["loss"] is None and m[2]["skipped"] == "non-finite loss"
        assert all(r["loss"] is not None for i, r in enumerate(m) if i != 2)
        state = json.loads((_ckpt(out, 5) / "trainer_state.json").read_text())
        assert state["nonfinite_skips"] == [3]
    else:
        assert code == 1 and "NonfiniteError: non-finite loss nan at step 3" in text, text[-3000:]
        assert [r["step"] for r in m] == [1, 2]
        assert CheckpointManager(out / "s" / "checkpoints").latest().name == "step-00000002"
