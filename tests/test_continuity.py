"""A run folder's trained stages belong to the recipe that trained them (mllm.training.continuity).

A finished stage is skipped and a checkpointed one resumed only when the recipe asks for what that state
was trained with; a weight-deciding change to it, or to anything before it, is refused with the field
named, while changes that only affect how the run is watched pass, and stages not yet begun may change.
"""

from __future__ import annotations

import copy
import os
import shutil

import pytest
from helpers import tiny_recipe, write_tiny_world

from mllm.config import recipe_from_dict
from mllm.training.continuity import RecipeChanged
from mllm.training.runner import train_recipe


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny two-stage run (torch backend, 3 + 3 steps) whose align stage is finished and instruct is not."""
    root = tmp_path_factory.mktemp("continuity")
    tree = tiny_recipe(write_tiny_world(root / "world", n=16), backend="torch", zero=None, steps=(3, 3))
    run = root / "run"
    train_recipe(recipe_from_dict(tree), run, only=["align"], log=quiet)
    return tree, run


def _with(tree: dict, stage: str | None, key: str, value) -> dict:
    tree = copy.deepcopy(tree)
    target = tree["engine"] if stage is None else next(s for s in tree["stages"] if s["name"] == stage)
    target[key] = value
    return tree


@pytest.mark.parametrize(
    "stage, key, value, field",
    [
        ("align", "max_steps", 6, "stages.align.max_steps: 3 -> 6"),
        ("align", "lr", 1e-3, "stages.align.lr: 0.003 -> 0.001"),
        (None, "seed", 1, "engine.seed: 0 -> 1"),
    ],
)
def test_a_finished_stage_trained_under_other_settings_is_refused_with_the_field_named(
    finished, stage, key, value, field
):
    tree, run = finished
    before = (run / "recipe.yaml").read_text()
    with pytest.raises(RecipeChanged) as e:
        train_recipe(recipe_from_dict(_with(tree, stage, key, value)), run, log=quiet)
    assert field in str(e.value) and str(run / "align") in str(e.value)
    assert (run / "recipe.yaml").read_text() == before  # the folder's record of what trained it stays
    assert not (run / "instruct" / "final").exists()


def test_a_changed_model_is_refused_and_a_removed_stage_is_named(finished):
    tree, run = finished
    bigger = copy.deepcopy(tree)
    bigger["model"]["max_length"] = 128
    with pytest.raises(RecipeChanged, match="model.max_length: 96 -> 128"):
        train_recipe(recipe_from_dict(bigger), run, log=quiet)
    renamed = copy.deepcopy(tree)
    renamed["stages"][0]["name"] = "align2"
    renamed["stages"][1]["init"] = None
    (run / "align2").symlink_to(run / "align", target_is_directory=True)
    try:
        with pytest.raises(RecipeChanged, match="has no stage 'align2'"):
            train_recipe(recipe_from_dict(renamed), run, only=["align2"], log=quiet)
    finally:
        (run / "align2").unlink()


def test_what_only_watches_the_run_may_change_and_a_stage_not_begun_may_change_freely(tmp_path, finished):
    """Logging, checkpoint cadence and the next stage's own settings change; align is still skipped."""
    tree, run = finished
    copy_run = tmp_path / "run"
    shutil.copytree(run, copy_run, symlinks=True)
    changed = _with(_with(tree, None, "log_every", 1), None, "checkpoint_every", 2)
    changed = _with(changed, "instruct", "lr", 1e-3)
    lines = []
    summary = train_recipe(recipe_from_dict(changed), copy_run, log=lines.append)
    assert any("[align] already finished" in line for line in lines)
    assert summary["stages"]["instruct"]["steps"] == 3
    # instruct is finished now under lr 1e-3: asking it again at the recipe's first lr is refused
    with pytest.raises(RecipeChanged, match="stages.instruct.lr: 0.001 -> 0.003"):
        train_recipe(recipe_from_dict(tree), copy_run, log=quiet)


def test_a_begun_stage_may_be_extended_from_its_checkpoint_and_nothing_else(tmp_path):
    """A stage with checkpoints but no final model resumes at a new length (reported in the log); another
    change to it is refused."""
    tree = tiny_recipe(write_tiny_world(tmp_path / "world", n=16), backend="torch", zero=None, steps=(3, 3))
    tree["engine"]["checkpoint_every"] = 1
    run = tmp_path / "run"
    train_recipe(recipe_from_dict(tree), run, only=["align"], log=quiet)
    shutil.rmtree(run / "align" / "final")  # begun, not finished: its checkpoints remain
    with pytest.raises(RecipeChanged, match="stages.align.lr: 0.003 -> 0.001"):
        train_recipe(
            recipe_from_dict(_with(_with(tree, "align", "max_steps", 5), "align", "lr", 1e-3)), run, log=quiet
        )
    lines: list[str] = []
    summary = train_recipe(
        recipe_from_dict(_with(tree, "align", "max_steps", 5)), run, only=["align"], log=lines.append
    )
    assert any("resumed from its checkpoint with stages.align.max_steps: 3 -> 5" in line for line in lines)
    assert summary["stages"]["align"]["steps"] == 5 and summary["stages"]["align"]["resumed_from"] == 3


def test_training_changes_name_the_leaf_and_take_one_path_spelled_two_ways(finished, monkeypatch):
    """The whole-run comparison the evidence runner uses: a changed option inside a nested mapping is named
    at its key; a data path given relative to the working folder equals its absolute spelling."""
    from mllm.training.continuity import training_changes

    tree, run = finished
    base = recipe_from_dict(tree)
    deeper = copy.deepcopy(tree)
    deeper["model"]["lm"]["config"]["num_hidden_layers"] = 3
    assert training_changes(base, recipe_from_dict(deeper)) == ["model.lm.config.num_hidden_layers: 2 -> 3"]
    monkeypatch.chdir(run.parent)
    relative = copy.deepcopy(tree)
    for stage in relative["stages"]:
        stage["data"]["json"] = os.path.relpath(stage["data"]["json"])
    assert not os.path.isabs(relative["stages"][0]["data"]["json"])
    assert training_changes(base, recipe_from_dict(relative)) == []
    assert training_changes(base, recipe_from_dict(_with(tree, "instruct", "lr", 1e-3))) == [
        "stages.instruct.lr: 0.003 -> 0.001"
    ]
