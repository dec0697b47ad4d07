"""CLIP-Refine (encoders.refine): RaFA and HyCD against naive transcriptions of the paper's formulas (values and
gradients, fp32, several batch sizes), the stage's module (frozen teacher outside the module tree), and the
`refine:` section refused at recipe load where it is wrong."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TOWER

from encoders.contrastive import ContrastiveModel, EncoderConfig
from encoders.refine import RefineConfig, RefineModule, hycd_loss, rafa_loss, refine_loss
from encoders.text_tower import TextTowerConfig, build_text_tower
from encoders.towers import TowerConfig, build_tower
from mllm.config import ConfigError, load_recipe

SIZES = (1, 5, 8, 13)  # 1, and sizes that are not a multiple of anything


def _pair(b: int, d: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = [F.normalize(torch.randn(b, d, generator=g), dim=-1) for _ in range(4)]
    return x


def naive_rafa(img, txt, ref):
    b, d = img.shape
    total = 0.0
    for i in range(b):
        for k in range(d):
            total = total + (img[i, k] - ref[i, k]) ** 2 / (b * d) + (txt[i, k] - ref[i, k]) ** 2 / (b * d)
    return total


def naive_hycd(img, txt, t_img, t_txt, s, s0, alpha, temp):
    """Per direction, per row i: y_j = alpha [j = i] + (1 - alpha) softmax_j(s0 q0_i . k0_j / T),
    p_j = softmax_j(s q_i . k_j / T), KL = sum_j y_j log(y_j / p_j); the mean over rows, directions averaged,
    times T^2."""
    b = img.shape[0]
    out = []
    for q, k, q0, k0 in ((img, txt, t_img, t_txt), (txt, img, t_txt, t_img)):
        rows = []
        for i in range(b):
            z = [s * (q[i] @ k[j]) / temp for j in range(b)]
            z0 = [s0 * (q0[i] @ k0[j]) / temp for j in range(b)]
            den = sum(torch.exp(v) for v in z)
            den0 = sum(torch.exp(v) for v in z0)
            kl = 0.0
            for j in range(b):
                y = alpha * (1.0 if i == j else 0.0) + (1 - alpha) * torch.exp(z0[j]) / den0
                if float(y) > 0:
                    kl = kl + y * (torch.log(y) - (z[j] - torch.log(den)))
            rows.append(kl)
        out.append(sum(rows) / b)
    return temp**2 * (out[0] + out[1]) / 2


@pytest.mark.parametrize("b", SIZES)
def test_rafa_matches_the_formula_values_and_gradients(b):
    img, txt, _, _ = _pair(b)
    ref = torch.randn(b, 7, generator=torch.Generator().manual_seed(3))
    a = [t.clone().requires_grad_() for t in (img, txt)]
    n = [t.clone().requires_grad_() for t in (img, txt)]
    la, ln = rafa_loss(a[0], a[1], ref), naive_rafa(n[0], n[1], ref)
    la.backward()
    ln.backward()
    assert torch.allclose(la, ln, atol=1e-6)
    for x, y in zip(a, n):
        assert torch.allclose(x.grad, y.grad, atol=1e-6)


@pytest.mark.parametrize("b", SIZES)
@pytest.mark.parametrize("alpha,temp", [(0.5, 1.0), (0.0, 2.0), (1.0, 0.5), (0.3, 1.0)])
def test_hycd_matches_the_formula_values_and_gradients(b, alpha, temp):
    img, txt, t_img, t_txt = _pair(b, seed=b)
    s0 = torch.tensor([12.0])
    a = [t.clone().requires_grad_() for t in (img, txt)] + [torch.tensor([9.0], requires_grad=True)]
    n = [t.clone().requires_grad_() for t in (img, txt)] + [torch.tensor([9.0], requires_grad=True)]
    la, stats = hycd_loss(a[0], a[1], t_img, t_txt, a[2], s0, alpha, temp)
    ln = naive_hycd(n[0], n[1], t_img, t_txt, n[2][0], s0[0], alpha, temp)
    la.backward()
    ln.backward()
    assert la.dtype == torch.float32 and torch.allclose(la, ln, atol=1e-5, rtol=1e-5), (float(la), float(ln))
    for x, y in zip(a, n):
        assert torch.allclose(x.grad, y.grad, atol=1e-5, rtol=1e-4)
    assert set(stats) >= {"acc_i2t", "acc_t2i", "loss_i2t", "loss_t2i"}


def test_hycd_alpha_one_is_clip_and_student_equal_teacher_at_alpha_zero_is_zero():
    img, txt, _, _ = _pair(6)
    s = torch.tensor([10.0])
    clip = (
        F.cross_entropy(s * img @ txt.T, torch.arange(6)) + F.cross_entropy(s * txt @ img.T, torch.arange(6))
    ) / 2
    # at alpha = 1, KL to the one-hot is the cross-entropy: CLIP's InfoNCE
    assert torch.allclose(hycd_loss(img, txt, txt, img, s, s, 1.0)[0], clip, atol=1e-6)
    # pure distillation of a model into itself is zero
    assert float(hycd_loss(img, txt, img, txt, s, s, 0.0)[0]) == pytest.approx(0.0, abs=1e-6)


def test_refine_loss_weights_and_the_teacher_gets_no_gradient():
    img, txt, t_img, t_txt = _pair(5)
    ref = torch.randn(5, 7)
    img.requires_grad_()
    t_img.requires_grad_()
    cfg = RefineConfig(alpha=0.4, weight_hycd=0.7, weight_rafa=2.0)
    s = torch.tensor([8.0])
    loss, stats = refine_loss(img, txt, t_img, t_txt, s, s, cfg, ref)
    want = 0.7 * hycd_loss(img, txt, t_img, t_txt, s, s, 0.4)[0] + 2.0 * rafa_loss(img, txt, ref)
    assert torch.allclose(loss, want)
    assert {"loss_hycd", "loss_rafa", "gap", "scale"} <= set(stats)
    loss.backward()
    assert img.grad is not None and t_img.grad is None


TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=96,
)


def _model(tokenizer) -> ContrastiveModel:
    torch.manual_seed(0)
    cfg = EncoderConfig(embed_dim=16, text=TextTowerConfig(config=TINY_TEXT, max_length=96))
    return ContrastiveModel(
        build_tower(TowerConfig(type="clip", config=TINY_TOWER, select_layer=-1)),
        build_text_tower(cfg.text, tokenizer),
        cfg,
    )


def test_refine_module_trains_the_model_against_a_frozen_copy(tokenizer):
    model = _model(tokenizer)
    module = RefineModule(model, RefineConfig(alpha=0.5))
    # the module's parameters are the model's own, by the same names; the teacher is not among them
    assert [n for n, _ in module.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert set(module.state_dict()) == set(model.state_dict())
    ids, mask = model.text_tower.tokenize(["a red circle", "two blue squares", "a star", "a green arrow"])
    pv = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    out = module(pixel_values=pv, input_ids=ids, attention_mask=mask)
    # the reference: the same formula on the model's embeddings, the teacher being the model itself
    torch.manual_seed(1)
    img, txt = model.encode_image(pv), model.encode_text(ids, mask)
    want, _ = refine_loss(
        img, txt, img.detach(), txt.detach(), model.logit_scale(), model.logit_scale(), module.cfg
    )
    assert torch.allclose(out.loss, want, atol=1e-6)
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    out.loss.backward()
    opt.step()
    teacher = module.__dict__["teacher"]
    moved = model.heads.image_proj.weight
    assert not torch.equal(moved, teacher.heads.image_proj.weight)  # the student moved, the teacher did not
    assert all(not p.requires_grad for p in teacher.parameters())


def test_refine_config_is_checked_at_recipe_load():
    ok = load_recipe("cliprefine-tiny")
    assert ok.stage("refine").refine == RefineConfig(alpha=0.5)
    for override, key in [
        ("stages.refine.refine.alpha=1.5", "refine.alpha"),
        ("stages.refine.refine.alpha=-0.1", "refine.alpha"),
        ("stages.refine.refine.temperature=0", "refine.temperature"),
        ("stages.refine.refine.prior_std=-1", "refine.prior_std"),
        ("stages.refine.refine.weight_rafa=-1", "refine.weight_rafa"),
        ("stages.refine.refine.bogus=1", "bogus"),
        ("stages.contrastive.refine={alpha: 0.5}", "stages.contrastive.refine"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
            load_recipe("cliprefine-tiny", [override])
        assert "\n" not in str(e.value)
    # a refine stage on a model that is not a contrastive pair
    with pytest.raises(ConfigError, match="model.kind is 'ssl'"):
        load_recipe("cliprefine-tiny", ["model.kind=ssl", "model.encoder=null"])


def test_distributed_equals_single_process(tmp_path):
    """Two gloo ranks, each with half the batch: the mean of their losses is the naive loss on the whole
    batch, each rank's gradient wrt its rows / world is the whole-batch gradient's slice, and the scale's
    gradient averaged over ranks is the whole-batch one."""
    import subprocess
    import sys
    from pathlib import Path

    import _dist_refine_worker as w
    from helpers import subprocess_env
    from safetensors.torch import load_file

    from mllm.training.distributed import free_port

    repo = Path(__file__).resolve().parents[1]
    world = 2
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(repo / "tests" / "_dist_refine_worker.py"), str(tmp_path)],
            env=subprocess_env(repo, RANK=str(r), LOCAL_RANK=str(r), OMP_NUM_THREADS="1", **env),
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    for r, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"rank {r} timed out")
        assert p.returncode == 0, f"rank {r} failed:\n{out}"
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(world)]
    full = w.global_batch(world)
    b = w.LOCAL_B
    for case, cfg in w.CASES.items():
        x = {k: full[k].clone().requires_grad_() for k in ("img", "txt", "scale")}
        ref = cfg["weight_hycd"] * naive_hycd(
            x["img"],
            x["txt"],
            full["t_img"],
            full["t_txt"],
            x["scale"][0],
            full["t_scale"][0],
            cfg["alpha"],
            cfg["temperature"],
        ) + cfg["weight_rafa"] * naive_rafa(x["img"], x["txt"], full["ref"])
        grads = dict(zip(("img", "txt", "scale"), torch.autograd.grad(ref, [x["img"], x["txt"], x["scale"]])))
        mean_loss = sum(rk[f"{case}.loss"] for rk in ranks) / world
        torch.testing.assert_close(mean_loss[0], ref.detach(), rtol=1e-10, atol=1e-10, msg=f"{case} loss")
        for r, rk in enumerate(ranks):
            for k in ("img", "txt"):
                torch.testing.assert_close(
                    rk[f"{case}.grad.{k}"] / world, grads[k][r * b : (r + 1) * b], rtol=1e-9, atol=1e-12
                )
        mean_g = sum(rk[f"{case}.grad.scale"] for rk in ranks) / world
        torch.testing.assert_close(mean_g, grads["scale"], rtol=1e-9, atol=1e-12, msg=f"{case} grad scale")


def test_a_recipe_trains_a_pair_then_refines_it(tmp_path):
    """Through the runner: a contrastive stage, then a `refine` stage starting from it; the refined pair is
    saved as an ordinary contrastive folder, its weights moved, and the metrics carry HyCD/RaFA's parts."""
    from safetensors.torch import load_file

    from mllm.config import recipe_from_dict
    from mllm.data.geoworld import write_world
    from mllm.training.runner import train_recipe

    world = tmp_path / "w"
    write_world(
        world,
        seed=3,
        n=24,
        size=48,
        n_eval=8,
        mmvp_pairs=2,
        pope_questions=2,
        refcoco_n=2,
        mathverse_problems=1,
        mmvp_vlm_pairs=2,
    )
    data = {"json": str(world / "captions.jsonl"), "images": str(world)}
    common = {"data": data, "lr": 2e-3, "batch_size": 8, "max_steps": 2, "warmup_ratio": 0.0}
    tree = {
        "name": "rtest",
        "model": {
            "kind": "contrastive",
            "tower": {"type": "clip", "config": TINY_TOWER, "select_layer": -1},
            "tokenizer": {"vocab_size": 400},
            "encoder": {"embed_dim": 16, "text": {"config": TINY_TEXT, "max_length": 96}},
        },
        "stages": [
            {"name": "contrastive", "kind": "contrastive", **common},
            {"name": "refine", "kind": "refine", "init": "contrastive", "refine": {"alpha": 0.3}, **common},
        ],
        "engine": {"backend": "torch", "zero_config": None, "precision": "fp32", "progress": False},
    }
    train_recipe(recipe_from_dict(tree), tmp_path / "run", log=lambda *_: None)
    before = load_file(str(tmp_path / "run" / "contrastive" / "final" / "heads.safetensors"))
    after = load_file(str(tmp_path / "run" / "refine" / "final" / "heads.safetensors"))
    assert set(before) == set(after)
    assert not torch.equal(before["image_proj.weight"], after["image_proj.weight"])
    ContrastiveModel.from_pretrained(tmp_path / "run" / "refine" / "final")
    rec = [json.loads(ln) for ln in (tmp_path / "run" / "refine" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_hycd", "loss_rafa", "gap"} <= set(rec[-1]["stats"])
