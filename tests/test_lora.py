"""LoRA stages via peft: what trains, what is saved, merge-lora, and resume from a LoRA checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_recipe, write_tiny_world
from safetensors.torch import load_file

from mllm import cli
from mllm.config import ConfigError, LoraConfig, recipe_from_dict
from mllm.lora import apply_lora, check_quantize
from mllm.model import MultimodalLM
from mllm.training.runner import build_model, run_stage

REPO = Path(__file__).resolve().parents[1]
LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "targets": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_tiny_world(tmp_path_factory.mktemp("world"), n=24)


@pytest.fixture(scope="module")
def base(world, tmp_path_factory):
    """A saved starting model (what the previous stage's final/ would be)."""
    out = tmp_path_factory.mktemp("base")
    recipe = recipe_from_dict(_recipe(world, "torch", None))
    build_model(recipe.model, out / "tok", [world["align"]], seed=0).save_pretrained(out / "model")
    return out / "model"


def _recipe(world, backend, zero, steps=6, every=0, keep=2):
    rec = tiny_recipe(world, backend, zero, steps=(1, steps), checkpoint_every=every)
    stage = rec["stages"][1]
    stage.update(lora=dict(LORA), trainable={"projector": 1e-2, "lm": 5e-3}, grad_accum=1, batch_size=4)
    rec["stages"] = [stage]
    rec["engine"]["keep_last"] = keep
    return rec


def _losses(stage_dir: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def _logits(model: MultimodalLM, world) -> torch.Tensor:
    from mllm.data.conversations import Collator, ConversationDataset

    ds = ConversationDataset(
        world["instruct"],
        world["images"],
        model.tokenizer,
        model.meta.template,
        model.image_token_id,
        model.num_image_tokens,
        model.tower.preprocess,
        96,
    )
    batch = Collator(model.tokenizer.pad_token_id)([ds[0], ds[1]])
    with torch.no_grad():
        return model.eval()(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits


def test_lora_stage_trains_adapters_and_projector_saves_merged_and_adapter(world, base, tmp_path):
    recipe = recipe_from_dict(_recipe(world, "torch", None, steps=4))
    stage = recipe.stages[0]
    model = MultimodalLM.from_pretrained(base)
    run_stage(model, recipe, stage, tmp_path / "instruct")

    lrs = json.loads((tmp_path / "instruct" / "metrics.jsonl").read_text().splitlines()[0])["lr"]
    assert {k.split("/")[0] for k in lrs} == {"projector", "lm"}  # the projector keeps its own rate
    assert max(v for k, v in lrs.items() if k.startswith("projector")) > max(
        v for k, v in lrs.items() if k.startswith("lm")
    )
    final = tmp_path / "instruct" / "final"
    merged = MultimodalLM.from_pretrained(final)
    assert not any("lora_" in n for n, _ in merged.named_parameters())  # a plain model for the next stage
    before = MultimodalLM.from_pretrained(base).state_dict()
    for k, v in merged.state_dict().items():
        changed = not torch.equal(v, before[k])
        expected = k.startswith("projector.") or (
            k.startswith("lm.") and ("q_proj" in k or "v_proj" in k) and k.endswith("weight")
        )
        assert changed == expected, k

    adapter = final / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4  # peft's own format
    assert any("lora_A" in k for k in load_file(str(adapter / "adapter_model.safetensors")))
    assert set(load_file(str(adapter / "non_lora_trainables.safetensors"))) == {
        n for n, _ in merged.projector.named_parameters(prefix="projector")
    }

    out = tmp_path / "merged"
    assert cli.main(["merge-lora", "--model", str(base), "--adapter", str(adapter), "--out", str(out)]) == 0
    torch.testing.assert_close(
        _logits(MultimodalLM.from_pretrained(out), world), _logits(merged, world), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("backend,zero", [("torch", None), ("deepspeed", "train/ds/zero2.json")])
def test_resume_from_a_lora_checkpoint_reproduces_the_loss_sequence(world, base, tmp_path, backend, zero):
    recipe = recipe_from_dict(
        _recipe(world, backend, str(REPO / zero) if zero else None, steps=6, every=2, keep=5)
    )
    stage = recipe.stages[0]
    full = tmp_path / "full"
    run_stage(MultimodalLM.from_pretrained(base), recipe, stage, full)
    want = _losses(full)
    assert len(want) == 6 and len(set(want)) > 1

    # The run as a kill after step 5 leaves it: checkpoints up to step 4, five metric lines, no final/.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-00000006")
    (cut / "checkpoints" / "latest").write_text("step-00000004\n")
    lines = (cut / "metrics.jsonl").read_text().splitlines()[:5]
    (cut / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines))

    # A fresh process would rebuild the base and re-wrap it (new random LoRA init): the checkpoint must win.
    result = run_stage(MultimodalLM.from_pretrained(base), recipe, stage, cut)
    assert result.resumed_from == 4
    assert _losses(cut) == want
    torch.testing.assert_close(
        _logits(MultimodalLM.from_pretrained(cut / "final"), world),
        _logits(MultimodalLM.from_pretrained(full / "final"), world),
    )


def test_qlora_refused_clearly_without_bitsandbytes_or_gpu(base):
    cfg = LoraConfig(r=4, alpha=8, quantize="4bit")
    with pytest.raises(ValueError, match="4bit.*(bitsandbytes|CUDA)"):
        check_quantize(cfg)
    model = MultimodalLM.from_pretrained(base)
    with pytest.raises(ValueError, match="QLoRA"):
        apply_lora(model, cfg)
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_lora_section_is_checked_by_the_recipe_schema(world):
    rec = _recipe(world, "torch", None)
    assert recipe_from_dict(rec).stages[0].lora == LoraConfig(
        r=4, alpha=8.0, dropout=0.1, targets=["q_proj", "v_proj"]
    )
    rec["stages"][0]["lora"]["rank"] = 8
    with pytest.raises(ConfigError, match="rank"):
        recipe_from_dict(rec)
