"""The training engine: stages under DeepSpeed ZeRO-2/3 and plain torch, declared trainables, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import subprocess_env, tiny_recipe, write_tiny_world

from mllm.config import recipe_from_dict
from mllm.model import MultimodalLM
from mllm.training.checkpoint import CheckpointManager
from mllm.training.runner import build_model, run_stage, train_recipe

REPO = Path(__file__).resolve().parents[1]


def _losses(stage_dir: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (stage_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_tiny_world(tmp_path_factory.mktemp("world"))


@pytest.mark.parametrize(
    "zero", ["train/ds/zero2.json", "train/ds/zero3.json", "train/ds/zero3_offload.json"]
)
def test_align_then_instruct_under_deepspeed(world, tmp_path, zero):
    recipe = recipe_from_dict(tiny_recipe(world, "deepspeed", str(REPO / zero), steps=(6, 12)))
    summary = train_recipe(recipe, tmp_path / "run", log=lambda *a: None)
    assert set(summary["stages"]) == {"align", "instruct"}
    losses = _losses(tmp_path / "run" / "instruct")
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    model = MultimodalLM.from_pretrained(summary["final"])
    assert model.num_image_tokens == 16


@pytest.mark.parametrize("backend,zero", [("torch", None), ("deepspeed", "train/ds/zero3.json")])
def test_stage_trains_only_what_it_declares(world, tmp_path, backend, zero):
    recipe = recipe_from_dict(tiny_recipe(world, backend, str(REPO / zero) if zero else None, steps=(3, 3)))
    model = build_model(recipe.model, tmp_path, [world["align"]], seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_stage(model, recipe, recipe.stage("align"), tmp_path / "align")
    after = MultimodalLM.from_pretrained(tmp_path / "align" / "final").state_dict()
    for k, v in before.items():
        changed = not torch.equal(v, after[k].to(v.dtype))
        assert changed == k.startswith("projector."), k


def _run_cli(recipe_path: Path, out: Path, fault: str | None) -> subprocess.CompletedProcess:
    env = subprocess_env(REPO, **({"MLLM_FAULT": fault} if fault else {}))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mllm.cli",
            "train",
            "--recipe",
            str(recipe_path),
            "--out",
            str(out),
            "--stage",
            "instruct",
            "model.init_from=" + str(out.parent / "base"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend,zero", [("torch", None), ("deepspeed", "train/ds/zero2.json")])
def test_kill_and_resume_reproduces_the_loss_sequence(world, tmp_path, backend, zero):
    rec = tiny_recipe(world, backend, str(REPO / zero) if zero else None, steps=(1, 8), checkpoint_every=2)
    rec["stages"] = [rec["stages"][1]]
    rec["engine"]["precision"] = "fp32"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rec))
    base = build_model(recipe_from_dict(rec).model, tmp_path / "tok", [world["align"]], seed=0)
    base.save_pretrained(tmp_path / "base")

    ref = _run_cli(path, tmp_path / "ref", None)
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = _losses(tmp_path / "ref" / "instruct")
    assert len(want) == 8

    # Killed after step 5: resumes from step 4. Killed inside the step-6 checkpoint write: resumes from 4 again.
    for fault, resumed in (("after_step:5", 4), ("mid_checkpoint:6", 4)):
        out = tmp_path / f"run-{fault.replace(':', '-')}"
        killed = _run_cli(path, out, fault)
        assert killed.returncode == -9, killed.stderr[-3000:]
        ckpts = CheckpointManager(out / "instruct" / "checkpoints")
        assert ckpts.latest().name == "step-00000004"
        if fault.startswith("mid"):
            assert (out / "instruct" / "checkpoints" / ".tmp-step-00000006").exists()
        done = _run_cli(path, out, None)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads((out / "run.json").read_text())["stages"]["instruct"]["resumed_from"] == resumed
        assert not list((out / "instruct" / "checkpoints").glob(".tmp-*"))
        assert _losses(out / "instruct") == want
