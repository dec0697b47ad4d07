"""`mllm train --dry-run` (mllm.planning): every GPU recipe composes on the meta device, the sizes match the
published figures, and bad input is a one-line error.

Published figures: LLaVA-1.5-7B 7.06 B parameters (llava-hf/llava-1.5-7b-hf's model card; CLIP ViT-L/14-336
304 M + the mlp2x_gelu projector 21 M + Vicuna-7B 6.74 B), 576 image tokens at 336 px (24 x 24 patches of
14 px); Llama-2-7B 6.74 B (6,738,415,616: Touvron et al. 2023 name it 7B; the HF model card 6.74 B);
Qwen2.5-7B 7.61 B and Qwen2.5-3B 3.09 B (their model cards' "Number of Parameters").
The meta device holds no storage, so a 7B model costs no memory here.
"""

from __future__ import annotations

import json

import pytest
import torch

from mllm.cli import main
from mllm.config import load_recipe, recipe_names
from mllm.model import build_lm
from mllm.planning import plan_recipe
from mllm.planning.build import build_meta
from mllm.planning.configs import MODEL_CONFIGS_DIR, SHIPPED, find_shipped

# The recipes written for GPUs are the DeepSpeed ones (the tiny CPU recipes run on plain torch); scanned,
# so a new GPU recipe is planned here without touching this file.
GPU_RECIPES = sorted(n for n in recipe_names() if load_recipe(n).engine.backend == "deepspeed")


def within(value: float, published: float, tol: float = 0.01) -> bool:
    return abs(value - published) <= tol * published


def test_every_training_task_has_a_workload_but_self_distillation():
    from mllm.families import TASKS
    from mllm.planning.workload import WORKLOADS

    assert set(TASKS) - set(WORKLOADS) == {"ssl"}  # DINO + iBOT: planned without FLOPs (docs/scale.md)


def test_the_gpu_recipes_are_found():
    expected = {"llava15-7b", "llava15-7b-lora", "mof-7b", "svemath-qwen2.5-7b", "prior-3b", "clip-b16"}
    assert expected | {"cloc-b16", "tips-b14"} <= set(GPU_RECIPES)


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_every_gpu_recipe_plans_on_the_meta_device(name):
    plan = plan_recipe(load_recipe(name))
    recipe = load_recipe(name)
    assert [s.name for s in plan.stages] == [s.name for s in recipe.stages]
    for s in plan.stages:
        assert s.params > 0 and 0 < s.trainable <= s.params, s.name
        assert s.flops_per_sample and s.flops_per_sample > 0 and s.step_s and s.step_s > 0, s.name
        assert [z.zero for z in s.zero] == ["0", "2", "3", "3+offload"]
        assert sum(z.recipe for z in s.zero) == 1, s.name  # the stage's own ZeRO config is marked
        states = {z.zero: z.states_gib for z in s.zero}
        assert states["0"] >= states["2"] >= states["3"] >= states["3+offload"] > 0, (s.name, states)
        assert s.activations_gc_gib <= s.activations_gib, s.name


@pytest.fixture(scope="module")
def llava():
    return build_meta(load_recipe("llava15-7b"))


def test_llava15_7b_matches_its_published_size(llava):
    model = llava.model
    assert all(p.device == torch.device("meta") for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert within(total, 7.06e9), total
    assert within(sum(p.numel() for p in model.projector.parameters()), 21e6), "projector"
    assert model.tower.image_size == 336 and model.tower.grid == (24, 24)
    assert model.num_image_tokens == 576
    assert {p.what: p.origin for p in llava.parts} == {"model.tower": "shipped", "model.lm": "shipped"}


@pytest.mark.parametrize(
    "name,published", [("Qwen2.5-7B", 7.61e9), ("Llama-2-7b-hf", 6.74e9), ("Qwen2.5-3B", 3.09e9)]
)
def test_shipped_lm_configs_have_their_published_size(name, published):
    shipped = SHIPPED[name.lower()]
    with torch.device("meta"):
        lm = build_lm(None, dict(shipped.config), shipped.config["vocab_size"])
    assert within(sum(p.numel() for p in lm.parameters()), published), name


def test_shipped_configs_are_package_data_and_found_by_path_or_hub_id():
    assert (MODEL_CONFIGS_DIR / "vicuna-7b-v1.5.json").is_file()
    assert MODEL_CONFIGS_DIR.parent.name == "mllm"
    assert find_shipped("/models/vicuna-7b-v1.5").id == "lmsys/vicuna-7b-v1.5"
    assert find_shipped("Qwen/Qwen2.5-7B-Instruct").id == "Qwen/Qwen2.5-7B-Instruct"
    assert find_shipped("/models/nothing-like-it") is None
    for entry in SHIPPED.values():
        assert entry.source and entry.kind in ("lm", "vision"), entry.id


def test_memory_is_deepspeeds_estimate_of_the_trainable_parameters(llava):
    """instruct (ZeRO-3 in the recipe) on 8 GPUs: DeepSpeed's 2 + 18/8 bytes (ZeRO-2) and 18/8 bytes + the
    largest layer (ZeRO-3) a trainable parameter, the frozen tower's bf16 weights beside them."""
    plan = plan_recipe(load_recipe("llava15-7b"), only=["instruct"])
    s = plan.stages[0]
    frozen = s.params - s.trainable
    zero = {z.zero: z for z in s.zero}
    assert zero["3"].recipe and not zero["2"].recipe
    expected2 = (2 * s.trainable + 18 * s.trainable // 8 + 2 * frozen) / 2**30
    assert zero["2"].states_gib == pytest.approx(expected2, rel=0.01)
    assert zero["0"].states_gib == pytest.approx((20 * s.trainable + 2 * frozen) / 2**30, rel=0.01)


def test_flops_follow_6n_and_time_follows_mfu_and_gpus():
    recipe = load_recipe("llava15-7b")
    base = plan_recipe(recipe, samples={"instruct": 665_000}, tokens={"instruct": 1000}, only=["instruct"])
    s = base.stages[0]
    lm_matmul = 6.74e9 - 32001 * 4096  # the embedding lookup has no matmul
    assert within(s.flops_by_module["lm"], 6 * lm_matmul * 1000, 0.05)  # + attention at 1000 tokens
    # frozen and ahead of what trains: forward only, 2N a token + attention (24 layers x 1024 wide)
    assert within(s.flops_by_module["tower"], 2 * 303.5e6 * 577 + 4 * 24 * 1024 * 577**2, 0.02)
    half = plan_recipe(
        recipe, mfu=0.2, samples={"instruct": 665_000}, tokens={"instruct": 1000}, only=["instruct"]
    )
    assert half.stages[0].step_s == pytest.approx(2 * s.step_s)
    more = plan_recipe(
        recipe, gpus=16, samples={"instruct": 665_000}, tokens={"instruct": 1000}, only=["instruct"]
    )
    assert more.stages[0].stage_s == pytest.approx(s.stage_s / 2, rel=0.01)


def test_lengths_come_from_the_data_when_it_is_here(tmp_path):
    recs = [
        {
            "id": str(i),
            "image": f"{i}.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe."},
                {"from": "gpt", "value": "a red circle " * (i + 1)},
            ],
        }
        for i in range(40)
    ]
    (tmp_path / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(recs))
    plan = plan_recipe(load_recipe("llava15-7b", [f"extra.data={tmp_path}"]), only=["align"])
    seq = plan.stages[0].sequence
    assert seq.samples == 40 and seq.images == 1 and "data: 40 of 40" in seq.source
    assert 576 < seq.mean < seq.max <= 2048 and seq.p50 <= seq.p90 <= seq.max
    assert plan.stages[0].steps == 1 and plan.stages[0].stage_s is not None


def test_a_local_or_inline_config_wins_over_the_shipped_one(tmp_path):
    tiny = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 1000,
    }
    (tmp_path / "config.json").write_text(json.dumps(tiny))
    local = build_meta(load_recipe("llava15-7b", [f"extra.lm={tmp_path}"]))
    assert [p.origin for p in local.parts if p.what == "model.lm"] == ["local"]
    assert sum(p.numel() for p in local.model.lm.parameters()) < 1e6
    inline = build_meta(
        load_recipe("llava15-7b", ["extra.lm=/elsewhere/mine", f"model.lm.config={json.dumps(tiny)}"])
    )
    assert [p.origin for p in inline.parts if p.what == "model.lm"] == ["inline"]


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mllm train: error: ")
    return err


def test_an_unknown_model_is_one_line_naming_the_three_ways(capsys):
    err = _one_line_error(
        capsys, ["train", "--recipe", "llava15-7b", "--dry-run", "extra.lm=/models/mystery-13b"]
    )
    assert "'/models/mystery-13b'" in err and "locally" in err and "inline" in err and "shipped" in err
    assert "vicuna-7b-v1.5" in err  # the shipped ones are listed


@pytest.mark.parametrize("flag,value", [("--mfu", "0"), ("--mfu", "1.5"), ("--mfu", "-0.3"), ("--gpus", "0")])
def test_bad_numbers_are_one_line_errors(capsys, flag, value):
    err = _one_line_error(capsys, ["train", "--recipe", "llava15-7b", "--dry-run", flag, value])
    assert flag in err


def test_plan_flags_without_dry_run_are_refused(capsys):
    assert "add --dry-run" in _one_line_error(capsys, ["train", "--recipe", "llava15-7b", "--gpus", "4"])


def test_json_output(capsys):
    assert (
        main(["train", "--recipe", "llava15-7b", "--dry-run", "--json", "--stage", "align", "--gpu", "a100"])
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    (stage,) = plan["stages"]
    assert plan["gpu"] == "a100" and plan["peak_tflops"] == 312.0 and plan["gpus"] == 8
    assert stage["name"] == "align" and stage["image_tokens"] == 576
    assert {z["zero"] for z in stage["zero"]} == {"0", "2", "3", "3+offload"}
