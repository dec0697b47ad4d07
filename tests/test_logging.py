"""Metric sinks (TensorBoard, W&B offline) beside metrics.jsonl, and the run folder's provenance."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_recipe, write_tiny_world

from mllm.config import recipe_from_dict
from mllm.logging_backends import flatten_metrics, open_loggers
from mllm.training.runner import train_recipe


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_tiny_world(tmp_path_factory.mktemp("world"), n=16)


def _run(world, tmp_path, loggers, steps=3):
    rec = tiny_recipe(world, "torch", None, steps=(steps, 1))
    rec["stages"] = rec["stages"][:1]
    rec["engine"]["loggers"] = loggers
    return train_recipe(recipe_from_dict(rec), tmp_path / "run", log=lambda *a: None)


def _jsonl(stage_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (stage_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_gets_the_same_scalars_as_metrics_jsonl(world, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(world, tmp_path, ["jsonl", "tensorboard"])
    stage = tmp_path / "run" / "align"
    acc = EventAccumulator(str(stage / "tensorboard"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    want = [(r["step"], r["loss"]) for r in _jsonl(stage)]
    assert [s for s, _ in loss] == [s for s, _ in want] == [1, 2, 3]
    assert [v for _, v in loss] == pytest.approx([v for _, v in want], rel=1e-6)
    assert "lr/projector/no_decay" in acc.Tags()["scalars"] or "lr/projector" in acc.Tags()["scalars"]


@pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None, reason="wandb is not installed (optional extra)"
)
def test_wandb_offline_logs_without_network(world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _run(world, tmp_path, ["wandb"], steps=2)
    runs = list((tmp_path / "run" / "align" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))  # the offline run file `wandb sync` uploads later
    assert (tmp_path / "run" / "align" / "metrics.jsonl").is_file()  # jsonl is always written


def test_named_but_missing_or_unknown_sinks_fail_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ValueError, match="'tensorboard'.*not installed"):
        open_loggers(["jsonl", "tensorboard"], tmp_path, "align")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match="'wandb'.*not installed"):
        open_loggers(["wandb"], tmp_path, "align")
    with pytest.raises(ValueError, match="unknown \\['mlflow'\\]"):
        open_loggers(["mlflow"], tmp_path, "align")
    assert open_loggers(["jsonl"], tmp_path, "align").sinks == []


def test_flatten_metrics_keeps_numbers_only():
    rec = {"step": 3, "loss": 1.5, "lr": {"projector": 1e-3, "lm/no_decay": 2e-5}, "skipped": "x", "ok": True}
    assert flatten_metrics(rec) == {"loss": 1.5, "lr/projector": 1e-3, "lr/lm/no_decay": 2e-5}


def test_run_folder_records_recipe_git_revision_and_environment(world, tmp_path):
    _run(world, tmp_path, ["jsonl"], steps=1)
    run = tmp_path / "run"
    assert (run / "recipe.yaml").is_file()
    env = json.loads((run / "env.json").read_text())["runs"]
    assert len(env) == 1
    info = env[0]
    assert (
        info["packages"]["torch"] == torch.__version__.split("+")[0]
        or info["packages"]["torch"] == torch.__version__
    )
    assert info["packages"]["transformers"] and info["python"].count(".") == 2
    assert info["world_size"] == 1 and info["cpu"]["count"] >= 1
    if (Path(__file__).resolve().parents[1] / ".git").exists():
        assert len(info["git"]["commit"]) == 40 and isinstance(info["git"]["dirty"], bool)
    _run(world, tmp_path, ["jsonl"], steps=1)  # a restart appends, keeping the first invocation's record
    assert len(json.loads((run / "env.json").read_text())["runs"]) == 2
