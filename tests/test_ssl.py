"""encoders.ssl: DINO + iBOT pieces against direct computations, the EMA teacher, the `ssl` model kind
(saved tower -> MultimodalLM), and a DeepSpeed ZeRO-2 run of the kind with a kill and a resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import subprocess_env

from encoders.ssl import (
    AugmentConfig,
    Augmenter,
    DINOHead,
    DistillConfig,
    EMATeacher,
    SSLConfig,
    SSLModel,
    block_mask,
    color_jitter,
    cosine_ramp,
    dino_loss,
    ema_update,
    ibot_loss,
    ibot_loss_selected,
    sample_masks,
    teacher_probs,
    teacher_temperature,
    updated_center,
)
from encoders.towers import TowerConfig, build_tower
from mllm.data.views import collate_views

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
)
TINY_DISTILL = dict(out_dim=48, patch_out_dim=40, head_hidden=32, head_bottleneck=16)


def assert_tower_loads_into_mllm(tower_dir: Path, tower_type: str, tokenizer, reference) -> None:
    """save -> TowerConfig(path=...) -> MultimodalLM.build -> forward (a loss), and the same tokens as
    `reference` (the trained tower in memory) on the same pixels."""
    from mllm.chat import encode_conversation
    from mllm.data.conversations import Collator
    from mllm.model import MultimodalLM, build_lm

    lm = build_lm(
        None,
        dict(
            model_type="llama",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
        ),
        len(tokenizer),
    )
    mllm = MultimodalLM.build(
        TowerConfig(type=tower_type, path=str(tower_dir), select_layer=-1),
        "mlp2x_gelu",
        lm,
        tokenizer,
        template="chatml",
        max_length=200,
    )
    pv = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(mllm.tower(pv).tokens, reference(pv).tokens, atol=1e-6)
    conv = [{"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "red"}]
    enc = encode_conversation(conv, tokenizer, "chatml", mllm.image_token_id, mllm.num_image_tokens, 1)
    batch = Collator(tokenizer.pad_token_id)([{"id": "0", **enc, "pixel_values": pv}])
    out = mllm(**{k: v for k, v in batch.items() if k not in ("skips", "ids")})
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert mllm.projector.parameters().__next__().grad is not None


# ----------------------------------------------------------------------------------------------- losses


def test_teacher_probs_centre_then_sharpen():
    logits, center = torch.randn(5, 7), torch.randn(1, 7)
    want = torch.softmax((logits - center) / 0.04, dim=-1)
    assert torch.allclose(teacher_probs(logits, center, 0.04), want)
    # a lower temperature is sharper (higher max probability)
    assert (
        teacher_probs(logits, center, 0.02).max(-1).values
        >= teacher_probs(logits, center, 0.1).max(-1).values
    ).all()


def test_center_update_is_the_ema_of_batch_means():
    center = torch.randn(1, 6)
    logits = torch.randn(8, 6)
    got = updated_center(center, logits, 0.9)
    assert torch.allclose(got, 0.9 * center + 0.1 * logits.mean(0, keepdim=True))
    # patch logits [B, N, K] average over every patch of every image
    patch = torch.randn(3, 4, 6)
    assert torch.allclose(
        updated_center(center, patch, 0.5), 0.5 * center + 0.5 * patch.reshape(-1, 6).mean(0)
    )


def test_dino_loss_equals_the_naive_sum_over_different_view_pairs():
    torch.manual_seed(0)
    student = [torch.randn(4, 9) for _ in range(4)]  # 2 global + 2 local
    teacher = [torch.softmax(torch.randn(4, 9), -1) for _ in range(2)]
    want, n = 0.0, 0
    for a in range(2):
        for b in range(4):
            if a == b:
                continue
            for i in range(4):
                logp = F.log_softmax(student[b][i] / 0.1, -1)
                want += -(teacher[a][i] * logp).sum().item() / 4
            n += 1
    assert n == 6
    assert math.isclose(dino_loss(student, teacher, 0.1).item(), want / n, rel_tol=1e-5)


def test_ibot_loss_only_masked_patches_count():
    torch.manual_seed(0)
    b, n, k = 3, 5, 6
    student = torch.randn(b, n, k, requires_grad=True)
    teacher = torch.softmax(torch.randn(b, n, k), -1)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    loss = ibot_loss(student, teacher, mask, 0.1)
    # naive: per image mean over its masked patches, mean over images that have a mask
    per = []
    for i in range(b):
        idx = mask[i].nonzero().flatten().tolist()
        if idx:
            per.append(
                sum(-(teacher[i, j] * F.log_softmax(student[i, j] / 0.1, -1)).sum() for j in idx) / len(idx)
            )
    assert torch.allclose(loss, torch.stack(per).mean())
    loss.backward()
    assert (student.grad[~mask] == 0).all() and (student.grad[mask].abs().sum(-1) > 0).all()
    # changing unmasked student logits (or teacher targets) leaves the loss unchanged
    other = student.detach().clone()
    other[~mask] = torch.randn_like(other[~mask]) * 10
    teacher2 = teacher.clone()
    teacher2[~mask] = torch.softmax(torch.randn_like(teacher2[~mask]), -1)
    assert torch.allclose(ibot_loss(other, teacher2, mask, 0.1), loss.detach())
    assert ibot_loss(student, teacher, torch.zeros(b, n, dtype=torch.bool), 0.1).item() == 0.0
    # the masked-tokens-only form the model uses gives the same value
    owner = mask.nonzero()[:, 0]
    fast = ibot_loss_selected(student.detach()[mask], teacher[mask], owner, b, 0.1)
    assert torch.allclose(fast, loss.detach())


def test_schedules():
    cfg = DistillConfig(teacher_temp_warmup=0.04, teacher_temp=0.07, teacher_temp_warmup_steps=10)
    assert teacher_temperature(cfg, 0) == 0.04
    assert math.isclose(teacher_temperature(cfg, 5), 0.055)
    assert teacher_temperature(cfg, 10) == teacher_temperature(cfg, 99) == 0.07
    assert cosine_ramp(0.996, 1.0, 0, 100) == 0.996
    assert math.isclose(cosine_ramp(0.996, 1.0, 50, 100), 0.998)
    assert cosine_ramp(0.996, 1.0, 100, 100) == 1.0


# ----------------------------------------------------------------------------------------- EMA teacher


def test_ema_update_math():
    t, s = [torch.ones(3), torch.zeros(2, 2)], [torch.full((3,), 3.0), torch.ones(2, 2)]
    ema_update(t, s, 0.9)
    assert torch.allclose(t[0], torch.full((3,), 0.9 + 0.3)) and torch.allclose(t[1], torch.full((2, 2), 0.1))


def test_ema_teacher_is_fp32_buffers_run_through_the_student_code():
    torch.manual_seed(0)
    head = DINOHead(8, 12, hidden=16, bottleneck=4)
    teacher = EMATeacher({"head": head})
    assert not list(teacher.parameters()) and all(b.dtype == torch.float32 for b in teacher.buffers())
    x = torch.randn(2, 8)
    assert torch.allclose(teacher.run("head", x), head(x))
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    with torch.no_grad():
        for p in head.parameters():
            p.add_(1.0)
    teacher.update(0.75)
    for n, p in head.named_parameters():
        assert torch.allclose(teacher.state_for("head")[n], 0.75 * before[n] + 0.25 * p.detach()), n
    assert not torch.allclose(teacher.run("head", x), head(x))


def test_dino_head_prototypes_are_unit_norm_cosines():
    head = DINOHead(8, 12, hidden=16, bottleneck=4)
    with torch.no_grad():
        head.prototypes.mul_(100.0)  # the row norm must not matter (norm_last_layer)
    out = head(torch.randn(5, 8))
    assert out.shape == (5, 12) and out.abs().max() <= 1.0 + 1e-5


def _ssl_model(grad_accum: int = 1, total: int = 10, **distill) -> SSLModel:
    torch.manual_seed(0)
    tower = build_tower(TowerConfig(type="dinov2", config=TINY_VIT, select_layer=-1))
    cfg = SSLConfig(
        distill=DistillConfig(**{**TINY_DISTILL, **distill}),
        augment=AugmentConfig(local_crops=2, local_size=16),
    )
    model = SSLModel(tower, cfg)
    model.configure_schedule(grad_accum, total)
    return model


def _views(model: SSLModel, n: int = 4, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    aug = Augmenter(
        model.cfg.augment, 32, model.image_tower.processor.image_mean, model.image_tower.processor.image_std
    )
    items = []
    for i in range(n):
        image = torch.rand(3, 40, 40, generator=gen)
        v = aug(image, gen)
        v["masks"] = sample_masks(2, model.image_tower.grid, 1.0, (0.2, 0.5), gen)
        items.append({"id": str(i), **v})
    return {k: v for k, v in collate_views(items).items() if k not in ("skips", "ids")}


def test_lazy_ema_folds_in_the_student_once_per_optimiser_step():
    model = _ssl_model(grad_accum=2, total=4, ema_momentum=0.9, ema_momentum_end=0.9)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = _views(model)

    def teacher_now() -> dict[str, torch.Tensor]:
        return {n: b.clone() for n, b in model.distill.teacher.state_for("backbone").items()}

    def same(a: dict, b: dict) -> bool:
        return all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)

    want = teacher_now()
    assert same(want, {n: p.detach() for n, p in model.image_tower.model.named_parameters()})
    for step in range(3):
        first = model(
            **batch
        )  # first micro-batch: folds in the student of the previous step (none at step 0)
        if step > 0:
            want = {
                n: 0.9 * want[n] + 0.1 * p.detach() for n, p in model.image_tower.model.named_parameters()
            }
        assert same(teacher_now(), want)
        first.loss.backward()
        model(**batch).loss.backward()  # second micro-batch: no EMA update
        assert same(teacher_now(), want)
        opt.step()
        opt.zero_grad()
        assert int(model.distill.micro_batches) == 2 * (step + 1) and model.distill.step == step + 1
    assert not same(teacher_now(), {n: p.detach() for n, p in model.image_tower.model.named_parameters()})


def test_ssl_forward_uses_the_mask_token_and_trains():
    model = _ssl_model()
    batch = _views(model)
    model.train()
    out = model(**batch)
    assert set(out.stats) >= {"dino", "ibot", "teacher_temp"} and torch.isfinite(out.loss)
    out.loss.backward()
    # the masked views went through Dinov2's own mask token
    assert model.image_tower.model.embeddings.mask_token.grad is not None
    assert model.image_tower.model.embeddings.mask_token.grad.abs().sum() > 0
    assert (
        model.distill.cls_head.prototypes.grad is not None
        and model.distill.patch_head.prototypes.grad is not None
    )
    assert int(model.distill.micro_batches) == 1 and model.distill.cls_center.abs().sum() > 0


# ----------------------------------------------------------------------------------------- augmentation


def test_block_mask_masks_exactly_the_ratio():
    gen = torch.Generator().manual_seed(0)
    for ratio in (0.1, 0.3, 0.5):
        m = block_mask((8, 8), ratio, gen)
        assert m.dtype == torch.bool and m.shape == (64,) and int(m.sum()) == round(ratio * 64)
    masks = sample_masks(50, (4, 4), 0.5, (0.25, 0.5), gen)
    per = masks.sum(1)
    assert ((per == 0) | ((per >= 4) & (per <= 8))).all() and 10 < int((per > 0).sum()) < 40


def test_augmenter_views_and_jitter_keep_range():
    gen = torch.Generator().manual_seed(0)
    aug = Augmenter(AugmentConfig(local_crops=3, local_size=16), 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    views = aug(torch.rand(3, 50, 60), gen)
    assert views["global_views"].shape == (2, 3, 32, 32) and views["local_views"].shape == (3, 3, 16, 16)
    assert views["global_views"].min() >= -1 - 1e-5 and views["global_views"].max() <= 1 + 1e-5
    assert not torch.equal(views["global_views"][0], views["global_views"][1])
    img = torch.rand(3, 8, 8)
    out = color_jitter(img, 0.4, gen)
    assert out.min() >= 0 and out.max() <= 1 and not torch.equal(out, img)
    # same generator state, same views (the engine's RNG restore makes a resume see the same crops)
    a = aug(img, torch.Generator().manual_seed(3))["global_views"]
    b = aug(img, torch.Generator().manual_seed(3))["global_views"]
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------- save and load


@pytest.mark.parametrize("export", ["student", "teacher"])
def test_ssl_tower_saves_and_loads_into_multimodal_lm(tokenizer, tmp_path, export):
    model = _ssl_model()
    model.cfg.export = export
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = _views(model)
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model(**batch)  # folds step 2 into the teacher
    model.save_pretrained(tmp_path / "ssl")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    back = SSLModel.from_pretrained(tmp_path / "ssl")
    for k, v in model.state_dict().items():
        if not k.startswith("image_tower."):
            assert torch.equal(v, back.state_dict()[k]), k
    reader = build_tower(
        TowerConfig(type="dinov2", path=str(tmp_path / "ssl" / "image_tower"), select_layer=-1)
    )
    want = (
        model.distill.teacher.state_for("backbone")
        if export == "teacher"
        else dict(model.image_tower.model.named_parameters())
    )
    for k, v in reader.model.named_parameters():
        assert torch.allclose(v, want[k]), k
    assert_tower_loads_into_mllm(tmp_path / "ssl" / "image_tower", "dinov2", tokenizer, reader)


def test_ssl_meta_is_versioned_and_old_folders_still_load(tmp_path):
    from encoders.common import FormatError

    model = _ssl_model().eval()
    model.save_pretrained(tmp_path / "ssl")
    meta = json.loads((tmp_path / "ssl" / "ssl.json").read_text())
    assert (meta["kind"], meta["format_version"]) == ("ssl", 1)
    del meta["format_version"]  # ssl.json before versions: kind only
    (tmp_path / "ssl" / "ssl.json").write_text(json.dumps(meta))
    back = SSLModel.from_pretrained(tmp_path / "ssl")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    (tmp_path / "ssl" / "ssl.json").write_text(json.dumps(dict(meta, format_version=2)))
    with pytest.raises(FormatError, match="'ssl' format_version 2 is newer"):
        SSLModel.from_pretrained(tmp_path / "ssl")
    (tmp_path / "ssl" / "ssl.json").write_text(json.dumps(dict(meta, kind="tips")))
    with pytest.raises(FormatError, match="holds a saved 'tips', not 'ssl'"):
        SSLModel.from_pretrained(tmp_path / "ssl")


# ------------------------------------------------------------------------------- DeepSpeed kill + resume


def _losses(stage_dir: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (stage_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("backend,zero", [("deepspeed", "train/ds/zero2.json"), ("torch", None)])
def test_ssl_kind_resumes_the_same_loss_sequence(tmp_path, backend, zero):
    """ZeRO-2 on CPU (and plain torch): killed after step 3 (checkpoint at 2), resumed; the loss sequence,
    the EMA teacher and the centres end where an uninterrupted run's do (they are buffers, which both
    checkpoint formats carry)."""
    from mllm.data.geoworld import write_world

    world = tmp_path / "world"
    write_world(
        world,
        seed=3,
        n=16,
        size=48,
        n_eval=8,
        mmvp_pairs=2,
        pope_questions=6,
        refcoco_n=2,
        mathverse_problems=1,
    )
    recipe = {
        "name": "ssl-test",
        "model": {
            "kind": "ssl",
            "tower": {"type": "dinov2", "config": TINY_VIT, "select_layer": -1},
            "encoder": {
                "distill": {**TINY_DISTILL, "mask_prob": 0.5},
                "augment": {"local_crops": 1, "local_size": 16},
            },
        },
        "stages": [
            {
                "name": "ssl",
                "kind": "ssl",
                "data": {"json": str(world / "captions.jsonl"), "images": str(world)},
                "lr": 1e-3,
                "batch_size": 4,
                "grad_accum": 2,
                "max_steps": 5,
                "warmup_ratio": 0.0,
            }
        ],
        "engine": {
            "backend": backend,
            "zero_config": str(REPO / zero) if zero else None,
            "precision": "fp32",
            "seed": 0,
            "checkpoint_every": 2,
            "keep_last": 2,
            "progress": False,
        },
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))

    def run(out: Path, fault: str | None) -> subprocess.CompletedProcess:
        env = subprocess_env(REPO, OMP_NUM_THREADS="1", **({"MLLM_FAULT": fault} if fault else {}))
        return subprocess.run(
            [sys.executable, "-m", "mllm.cli", "train", "--recipe", str(path), "--out", str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )

    ref = run(tmp_path / "ref", None)
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = _losses(tmp_path / "ref" / "ssl")
    assert len(want) == 5
    killed = run(tmp_path / "cut", "after_step:3")
    assert killed.returncode == -9, killed.stderr[-3000:]
    done = run(tmp_path / "cut", None)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["stages"]["ssl"]["resumed_from"] == 2
    assert _losses(tmp_path / "cut" / "ssl") == pytest.approx(want, rel=1e-5)
    a = SSLModel.from_pretrained(tmp_path / "ref" / "ssl" / "final").state_dict()
    b = SSLModel.from_pretrained(tmp_path / "cut" / "ssl" / "final").state_dict()
    for k in (
        "distill.micro_batches",
        "distill.cls_center",
        "distill.teacher.backbone__embeddings__cls_token",
    ):
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    assert int(a["distill.micro_batches"]) == 10


# ----------------------------------------------------------------------------------------------- recipes


def check_recipe(name: str, build: bool, world: Path | None = None, tmp: Path | None = None):
    """The recipe parses, names registered kinds, its configs validate; with `build`, its model kind
    builds the model (on a tiny world) and the stage's task builds its dataset."""
    from encoders.towers import TOWERS
    from mllm.config import load_recipe
    from mllm.families import get_family, get_stage_kind, get_task, resolve_trainable

    overrides = [f"extra.world={world}"] if world is not None else []
    recipe = load_recipe(REPO / "train" / "recipes" / f"{name}.yaml", overrides)
    kind = get_family(recipe.model.kind)
    assert recipe.model.tower.type in TOWERS
    tower_cfg = TOWERS[recipe.model.tower.type].config_cls(**recipe.model.tower.config)
    assert tower_cfg.image_size % tower_cfg.patch_size == 0
    for stage in recipe.stages:
        get_stage_kind(stage.kind)
    if not build:
        return recipe
    model = kind.build(recipe.model, tmp, [Path(s.data.json) for s in recipe.stages if s.data.json], 0)
    stage = recipe.stages[0]
    module, ds, collate = get_task(get_stage_kind(stage.kind).task)(model, stage, "plain")
    batch = collate([ds[0], ds[1]])
    assert batch["ids"] and not batch["skips"]
    names = {n.split(".")[0] for n, _ in module.named_parameters()}
    assert set(resolve_trainable(stage)) <= names, (resolve_trainable(stage), names)
    return recipe


@pytest.fixture(scope="module")
def recipe_world(tmp_path_factory):
    from mllm.data.geoworld import write_world

    out = tmp_path_factory.mktemp("recipe-world")
    write_world(
        out, seed=5, n=8, size=64, n_eval=8, mmvp_pairs=2, pope_questions=6, refcoco_n=2, mathverse_problems=1
    )
    return out


def test_dino_tiny_recipe_builds(recipe_world, tmp_path):
    recipe = check_recipe("dino-tiny", True, recipe_world, tmp_path)
    assert recipe.model.kind == "ssl" and recipe.model.tower.type == "dinov2"
