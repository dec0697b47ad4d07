"""How a stage starts: from the recipe's seed whatever ran before it, and from memoised samples."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from helpers import tiny_recipe, write_tiny_world
from torch.utils.data import Dataset

from encoders.common import ConfigError
from mllm.config import load_recipe, recipe_from_dict
from mllm.data.memo import MemoDataset
from mllm.families.mllm import build_model
from mllm.training.runner import run_stage


def test_a_stage_starts_the_same_whatever_ran_before_it(tmp_path):
    """LoRA's A matrices are drawn when the stage starts: a run resumed at this stage (a fresh process)
    or one stage run alone must draw what the uninterrupted run drew, not what the RNG was left at."""
    world = write_tiny_world(tmp_path / "w", n=16)
    rec = tiny_recipe(world, "torch", None, steps=(1, 3))
    rec["stages"][1]["lora"] = {"r": 4, "alpha": 8.0, "dropout": 0.0}
    recipe = recipe_from_dict(rec)
    losses = []
    for junk in (1, 2):
        model = build_model(recipe.model, tmp_path, [world["instruct"]], seed=0)
        torch.manual_seed(junk)  # what earlier stages of this process left in the global RNG
        torch.rand(100 * junk)
        losses.append(run_stage(model, recipe, recipe.stage("instruct"), tmp_path / f"i{junk}").losses)
    assert len(losses[0]) == 3 and losses[0] == losses[1]


class _Counting(Dataset):
    def __init__(self):
        self.made: list[int] = []
        self.rows = ["a", "b", "c"]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        self.made.append(i)
        return {"x": torch.full((2,), float(i))}


def test_memo_makes_each_sample_once_and_keeps_the_wrapped_datasets_face():
    inner = _Counting()
    ds = MemoDataset(inner)
    first = [ds[i] for i in (2, 0, 2, 1, 0)]
    assert inner.made == [2, 0, 1]  # each row made once, in first-use order
    assert first[0] is first[2] and torch.equal(first[1]["x"], torch.zeros(2))
    assert len(ds) == 3 and ds.rows == ["a", "b", "c"]  # what a stage reads off its dataset


def test_cache_samples_is_refused_outside_the_warmup(tmp_path):
    base = tiny_recipe(write_tiny_world(tmp_path / "w", n=4), backend="torch", zero=None)
    r = copy.deepcopy(base)
    r["stages"][1]["data"]["cache_samples"] = True
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    with pytest.raises(ConfigError, match=r"stages.instruct.data.cache_samples: only `tower_warmup`"):
        load_recipe(p)
