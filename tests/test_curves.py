"""Learning curves: `eval_every` evaluations during training (evals.jsonl) and `mllm plot`."""

from __future__ import annotations

import ast
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_recipe, write_tiny_world

from mllm.cli import main
from mllm.config import ConfigError, recipe_from_dict
from mllm.evaluation.benchmarks import Item
from mllm.evaluation.periodic import balanced_subset, make_evaluator
from mllm.training.runner import train_recipe

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUIET = dict(log=lambda *a: None)


def _write_qa(world: Path, n: int = 16) -> None:
    """A held-out QA file in GeoWorld's layout over the tiny world's images, ordered by category (all
    colour questions first) so that a balanced slice has to interleave them."""
    rows = json.loads((world / "align.json").read_text())
    out = []
    for cat in ("colour", "shape"):
        for r in rows[: n // 2]:
            colour, shape = r["conversations"][1]["value"].split()[1:]
            q = "What color is the shape?" if cat == "colour" else "What shape is it?"
            out.append(
                {
                    "id": f"{cat}-{r['id']}",
                    "image": r["image"],
                    "question": q,
                    "answer": colour if cat == "colour" else shape,
                    "category": cat,
                }
            )
    (world / "eval").mkdir(exist_ok=True)
    (world / "eval" / "qa.jsonl").write_text("".join(json.dumps(o) + "\n" for o in out))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = write_tiny_world(tmp_path_factory.mktemp("world"))
    _write_qa(w["images"])
    return w


def _tree(world, steps: int = 5, eval_every: int | None = 2, dropout: float = 0.0, **stage) -> dict:
    """The tiny recipe's align stage alone, on the torch backend, evaluating a 6-item QA slice."""
    tree = tiny_recipe(world, "torch", None, steps=(steps, 1), checkpoint_every=2)
    tree["stages"] = tree["stages"][:1]
    tree["model"]["lm"]["config"]["attention_dropout"] = dropout
    if eval_every is not None:
        tree["stages"][0].update(
            eval_every=eval_every,
            eval={
                "benchmark": "qa",
                "data": str(world["images"]),
                "limit": 6,
                "batch_size": 6,
                "max_new_tokens": 4,
            },
        )
    tree["stages"][0].update(stage)
    return tree


def _lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    recipe = recipe_from_dict(_tree(world))
    out = tmp_path_factory.mktemp("curves") / "run"
    train_recipe(recipe, out, evaluator=make_evaluator(recipe), **QUIET)
    return out


def test_eval_every_writes_a_line_every_n_steps_and_at_the_last(run):
    evals = _lines(run / "align" / "evals.jsonl")
    assert [e["step"] for e in evals] == [2, 4, 5]
    for e in evals:
        assert e["benchmark"] == "qa" and e["n"] == 6
        assert set(e["per_category"]) == {"colour", "shape"}
        assert 0.0 <= e["accuracy"] <= 100.0 and e["eval_s"] > 0
    # wall_s is the training clock (metrics.jsonl's step_s summed): evaluation time is not in it.
    step_s = {m["step"]: m["step_s"] for m in _lines(run / "align" / "metrics.jsonl")}
    for e in evals:
        assert e["wall_s"] == pytest.approx(sum(v for k, v in step_s.items() if k <= e["step"]), abs=1e-3)


def test_balanced_subset_interleaves_categories_in_file_order():
    items = [Item(id=f"{c}{i}", prompt="", image=None, meta={"category": c}) for c in "ab" for i in range(5)]
    assert [it.id for it in balanced_subset(items, 5)] == ["a0", "b0", "a1", "b1", "a2"]
    assert balanced_subset(items, None) == items and balanced_subset(items, 50) == items
    uneven = items[:2] + items[5:]  # 2 a's, 5 b's: the rest of the slice comes from b
    assert [it.id for it in balanced_subset(uneven, 6)] == ["a0", "b0", "a1", "b1", "b2", "b3"]


@pytest.mark.parametrize("zero", [None, "train/ds/zero2.json"])
def test_training_is_identical_with_and_without_eval_every(world, tmp_path, zero):
    """Dropout on (so training consumes the RNG) and an evaluator that draws from every RNG: the
    engine's eval mode and RNG restore must leave the loss sequence bit-identical, on plain torch and
    under DeepSpeed ZeRO-2."""

    def tree(eval_every):
        t = _tree(world, eval_every=eval_every, dropout=0.2)
        if zero:
            t["engine"].update(backend="deepspeed", zero_config=str(REPO / zero))
        return t

    plain = recipe_from_dict(tree(None))
    train_recipe(plain, tmp_path / "plain", **QUIET)

    inner = make_evaluator()
    seen_training: list[bool] = []

    def greedy_rng_eater(model, stage, step):
        seen_training.append(model.training)
        torch.rand(1000), np.random.rand(10), random.random()
        return inner(model, stage, step)

    evaluated = recipe_from_dict(tree(2))
    train_recipe(evaluated, tmp_path / "evaluated", evaluator=greedy_rng_eater, **QUIET)
    losses = [
        [m["loss"] for m in _lines(tmp_path / r / "align" / "metrics.jsonl")] for r in ("plain", "evaluated")
    ]
    assert len(losses[0]) == 5 and losses[0] == losses[1]
    assert seen_training == [False, False, False]


def test_resume_drops_a_torn_eval_line_and_evaluates_again(world, run, tmp_path):
    """Killed after step 5's evaluation line was half-written and before its checkpoint: the resumed
    run drops the torn line, replays step 5 from the step-4 checkpoint and writes step 5's line once."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    stage = copy / "align"
    shutil.rmtree(stage / "final")
    shutil.rmtree(stage / "checkpoints" / "step-00000005")
    good = (stage / "evals.jsonl").read_text()
    (stage / "evals.jsonl").write_text(good + good.splitlines()[-1][:25])  # a torn line past the checkpoint
    recipe = recipe_from_dict(_tree(world))
    summary = train_recipe(recipe, copy, evaluator=make_evaluator(recipe), **QUIET)
    assert summary["stages"]["align"]["resumed_from"] == 4
    again = _lines(stage / "evals.jsonl")
    before = [json.loads(ln) for ln in good.splitlines()]
    assert [e["step"] for e in again] == [2, 4, 5]
    assert [e["accuracy"] for e in again] == [e["accuracy"] for e in before]
    assert again[2]["wall_s"] >= again[1]["wall_s"]


def test_plot_writes_a_png(run, tmp_path, capsys):
    assert main(["plot", str(run)]) == 0
    png = run / "curves.png"
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert capsys.readouterr().out.strip() == str(png)
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes().startswith(PNG_MAGIC)


def test_plot_refuses_a_run_without_metrics(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "align").mkdir(parents=True)
    (empty / "align" / "metrics.jsonl").write_text('{"step": 1, "lo')  # only a torn line
    assert main(["plot", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(empty) in err and "no metrics" in err
    assert not list(empty.rglob("*.png")) and not list(empty.rglob(".tmp-*"))
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err


def test_eval_every_larger_than_the_stage_is_refused(world, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"eval_every=10 is larger than the stage \(max_steps=5\)"):
        recipe_from_dict(_tree(world, eval_every=10))
    with pytest.raises(ConfigError, match="eval_every=0 must be a positive"):
        recipe_from_dict(_tree(world, eval_every=0))
    with pytest.raises(ConfigError, match="unknown key.*'bogus'"):
        recipe_from_dict(_tree(world, eval={"data": "x", "bogus": 1}))
    # From the command line: one line naming the value, exit 2, no run folder.
    (tmp_path / "r.yaml").write_text(json.dumps(_tree(world)))
    out = tmp_path / "out"
    assert (
        main(["train", "--recipe", str(tmp_path / "r.yaml"), "--out", str(out), "stages.align.eval_every=9"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "eval_every=9" in err and not out.exists()


def test_eval_every_larger_than_an_epoch_sized_stage_is_refused_at_its_start(world, tmp_path):
    tree = _tree(world, eval_every=7, max_steps=None, epochs=1.0)  # 48 samples / batch 8 = 6 steps
    recipe = recipe_from_dict(tree)
    with pytest.raises(ConfigError, match=r"eval_every=7 is larger than the stage \(6 optimiser steps\)"):
        train_recipe(recipe, tmp_path / "run", evaluator=make_evaluator(recipe), **QUIET)
    assert not (tmp_path / "run" / "align" / "metrics.jsonl").exists()


def test_eval_every_needs_an_evaluator_and_zero2(world, tmp_path):
    recipe = recipe_from_dict(_tree(world))
    with pytest.raises(ValueError, match="sets eval_every but train_recipe got no evaluator"):
        train_recipe(recipe, tmp_path / "none", **QUIET)
    assert not (tmp_path / "none").exists()
    tree = _tree(world)
    tree["engine"].update(backend="deepspeed", zero_config=str(REPO / "train/ds/zero3.json"))
    recipe = recipe_from_dict(tree)
    with pytest.raises(ConfigError, match="eval_every=2 is not supported under ZeRO-3"):
        train_recipe(recipe, tmp_path / "z3", evaluator=make_evaluator(recipe), **QUIET)


def test_bad_eval_data_fails_before_training(world, tmp_path):
    recipe = recipe_from_dict(_tree(world, eval={"benchmark": "qa", "data": str(tmp_path / "nowhere")}))
    with pytest.raises(FileNotFoundError, match="stage 'align' eval: .*nowhere"):
        make_evaluator(recipe)


def test_training_never_imports_evaluation():
    """The layering rule: mllm.training takes an evaluator but imports nothing from mllm.evaluation."""
    for path in (REPO / "mllm" / "training").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.startswith("mllm.evaluation") for n in names), path
