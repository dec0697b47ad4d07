"""ALBEF and DeGLA (encoders.albef, encoders.degla, encoders.ema): each loss term against a naive transcription
of the paper's (or the authors' code's) formula, values and gradients in fp32 at several batch sizes; the EMA
update and the EMA call; ITM's hard-negative draws; a few steps lower the loss; the saved folder reads as a
contrastive pair; the recipes build and bad configuration is refused when the recipe loads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_ssl import assert_tower_loads_into_mllm, check_recipe, recipe_world  # noqa: F401

from encoders.albef import (
    AlbefConfig,
    AlbefModel,
    albef_itc,
    albef_mlm,
    itm_negative_weights,
    mask_tokens,
    sample_itm_negatives,
)
from encoders.common import ConfigError
from encoders.contrastive import ContrastiveModel, EncoderConfig
from encoders.degla import DeglaConfig, DeglaModel, degla_distill, degla_global, degla_igc, degla_tgc
from encoders.ema import EmaCopy
from encoders.text_tower import TextTowerConfig, build_text_tower
from encoders.towers import TowerConfig, build_tower

SIZES = (1, 3, 7)
TINY_VIT = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=64,
)
CAPTIONS = [
    "A large red circle at the top left.",
    "A small blue square.",
    "A green triangle pointing up.",
    "Two shapes: a red circle and a blue square.",
]
NEGATIVES = [
    ["A large blue circle at the top left.", "A large red circle at the bottom right."],
    ["A small red square.", "A small blue square."],
    ["A green triangle pointing down.", "A blue triangle pointing up."],
    ["Two shapes: a blue circle and a red square.", "Two shapes: a red square and a blue circle."],
]


def _unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1).requires_grad_(True)


def _grads(loss: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, xs))


# ------------------------------------------------------------------------------------------- EMA helper


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 2)
        self.b = torch.nn.Linear(2, 1)
        self.ema = EmaCopy(self, ("a",))

    def f(self, x):
        return self.b(self.a(x))


def test_ema_update_math_and_call_runs_the_model_on_the_copy():
    torch.manual_seed(0)
    toy = _Toy()
    w0 = toy.a.weight.detach().clone()
    with torch.no_grad():
        toy.a.weight.add_(1.0)
    toy.ema.update(0.9)
    ema_w = toy.ema.tensors()["a.weight"]
    assert torch.allclose(ema_w, 0.9 * w0 + 0.1 * (w0 + 1.0), atol=1e-6)
    assert set(toy.ema.tensors()) == {"a.weight", "a.bias"}  # only the named children
    assert {k for k in toy.state_dict() if k.startswith("ema.")} == {"ema.a__weight", "ema.a__bias"}
    x = torch.randn(4, 3)
    out = toy.ema.call(toy.f, x)
    ref = toy.b(F.linear(x, ema_w, toy.ema.tensors()["a.bias"]))
    assert torch.allclose(out, ref, atol=1e-6) and not out.requires_grad
    assert torch.equal(toy.a.weight, w0 + 1.0)  # the student is untouched after the call
    toy.ema.update(0.0)  # momentum 0: the copy becomes the student
    assert torch.equal(toy.ema.tensors()["a.weight"], toy.a.weight.detach())


# ------------------------------------------------------------------------------------------- ALBEF losses


def _naive_itc(img, txt, img_m, txt_m, s, alpha, img_q=None, txt_q=None):
    """ALBEF eq. (1)-(2) and (4): keys are the momentum embeddings of the batch, then the queue's."""
    b = img.shape[0]
    keys_t = [txt_m[j] for j in range(b)] + ([] if txt_q is None else list(txt_q))
    keys_i = [img_m[j] for j in range(b)] + ([] if img_q is None else list(img_q))
    total = 0.0
    for q, keys, q_m in ((img, keys_t, img_m), (txt, keys_i, txt_m)):
        part = 0.0
        for i in range(b):
            logits = [s * (q[i] @ k) for k in keys]
            lse = torch.logsumexp(torch.stack(logits), 0)
            soft = torch.softmax(torch.stack([s * (q_m[i] @ k) for k in keys]).detach(), 0)
            for j in range(len(keys)):
                y = alpha * soft[j] + (1 - alpha) * (1.0 if i == j else 0.0)
                part = part - y * (logits[j] - lse)
        total = total + part / b
    return total / 2


@pytest.mark.parametrize("b", SIZES)
@pytest.mark.parametrize("alpha", (0.0, 0.4, 1.0))
@pytest.mark.parametrize("queue", (0, 5))
def test_albef_itc_matches_the_papers_formula(b, alpha, queue):
    img, txt = _unit(b, 8, seed=1), _unit(b, 8, seed=2)
    img_m, txt_m = _unit(b, 8, seed=3).detach(), _unit(b, 8, seed=4).detach()
    img_q, txt_q = (
        (_unit(queue, 8, seed=5).detach(), _unit(queue, 8, seed=6).detach()) if queue else (None, None)
    )
    scale = torch.tensor([7.0], requires_grad=True)
    loss, stats = albef_itc(img, txt, img_m, txt_m, scale, alpha, img_q, txt_q)
    ref = _naive_itc(img, txt, img_m, txt_m, scale[0], alpha, img_q, txt_q)
    assert torch.allclose(loss, ref, atol=1e-5), (loss, ref)
    for g, r in zip(_grads(loss, img, txt, scale), _grads(ref, img, txt, scale), strict=True):
        assert torch.allclose(g, r, atol=1e-5)
    assert 0 <= stats["acc_i2t"] <= 1


def _naive_mlm(logits, labels, logits_m, alpha):
    terms = []
    for bi in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[bi, t] == -100:
                continue
            logp = torch.log_softmax(logits[bi, t], 0)
            q = torch.softmax(logits_m[bi, t], 0)
            terms.append((1 - alpha) * -logp[labels[bi, t]] + alpha * -(q * logp).sum())
    return torch.stack(terms).mean()


@pytest.mark.parametrize("b", SIZES)
def test_albef_mlm_matches_the_distilled_cross_entropy(b):
    g = torch.Generator().manual_seed(b)
    logits = torch.randn(b, 5, 11, generator=g, requires_grad=True)
    logits_m = torch.randn(b, 5, 11, generator=g)
    labels = torch.randint(11, (b, 5), generator=g)
    labels[:, ::2] = -100
    for alpha in (0.0, 0.4):
        loss = albef_mlm(logits, labels, logits_m, alpha)
        ref = _naive_mlm(logits, labels, logits_m, alpha)
        assert torch.allclose(loss, ref, atol=1e-5)
        assert torch.allclose(_grads(loss, logits)[0], _grads(ref, logits)[0], atol=1e-6)
    empty = torch.full_like(labels, -100)
    assert albef_mlm(logits, empty, logits_m, 0.4).item() == 0.0  # no masked token: no loss, no NaN


def test_mask_tokens_masks_only_real_words_and_labels_them():
    ids = torch.tensor([[1, 10, 11, 12, 2, 0], [1, 13, 2, 0, 0, 0]])
    mask = (ids != 0).long()
    torch.manual_seed(0)
    for prob in (0.15, 0.99):
        masked, labels = mask_tokens(ids, mask, prob, mask_id=0, vocab_size=20, special_ids={0, 1, 2})
        chosen = labels != -100
        assert chosen.any()  # at least one even when the draw chose none
        assert not (chosen & ((ids <= 2) | (mask == 0))).any()  # BOS, EOS, pad never chosen
        assert torch.equal(labels[chosen], ids[chosen])
        assert torch.equal(masked[~chosen], ids[~chosen])


@pytest.mark.parametrize("b", (1, 2, 5, 9))
def test_itm_negatives_never_draw_the_positive_or_an_identical_caption(b):
    g = torch.Generator().manual_seed(b)
    same = torch.zeros(b, b, dtype=torch.bool)
    if b >= 5:
        same[0, 1] = same[1, 0] = True  # rows 0 and 1 carry the very same caption
    for _ in range(30):
        sim = torch.randn(b, b, generator=g) * 10
        sim.fill_diagonal_(50.0)  # the positive is by far the most similar: still never drawn
        img_rows, neg_txt, txt_rows, neg_img = sample_itm_negatives(
            sim, sim.T.contiguous(), same, generator=g
        )
        for rows, picks in ((img_rows, neg_txt), (txt_rows, neg_img)):
            assert not (rows == picks).any()
            assert not same[rows, picks].any()
            assert len(rows) == (0 if b == 1 else b)
    w = itm_negative_weights(torch.zeros(3, 3))
    assert torch.allclose(w.sum(1), torch.full((3,), 2 * (1 / 3 + 1e-5)))  # softmax + 1e-5 off the diagonal


# ------------------------------------------------------------------------------------------- DeGLA losses


def _naive_grounded(anchor, pos, neg, valid, s):
    terms = []
    for i in range(anchor.shape[0]):
        logits = [s * (anchor[i] @ pos[i])] + [
            s * (anchor[i] @ neg[i, k]) for k in range(neg.shape[1]) if valid[i, k]
        ]
        terms.append(-(logits[0] - torch.logsumexp(torch.stack(logits), 0)))
    return torch.stack(terms).mean()


def _naive_global(img, txt, neg, valid, s):
    b = img.shape[0]
    cols = [txt[j] for j in range(b)] + [
        neg[j, k] for j in range(b) for k in range(neg.shape[1]) if valid[j, k]
    ]
    i2t = torch.stack(
        [
            -(s * img[i] @ txt[i] - torch.logsumexp(torch.stack([s * img[i] @ c for c in cols]), 0))
            for i in range(b)
        ]
    ).mean()
    t2i = torch.stack(
        [
            -(s * txt[i] @ img[i] - torch.logsumexp(torch.stack([s * txt[i] @ img[j] for j in range(b)]), 0))
            for i in range(b)
        ]
    ).mean()
    return (i2t + t2i) / 2


@pytest.mark.parametrize("b", SIZES)
@pytest.mark.parametrize("k", (1, 3))
def test_degla_losses_match_the_authors_formulas(b, k):
    img, txt, neg = _unit(b, 8, seed=1), _unit(b, 8, seed=2), _unit(b, k, 8, seed=3)
    t_img, t_txt, t_neg = (
        _unit(b, 8, seed=4).detach(),
        _unit(b, 8, seed=5).detach(),
        _unit(b * k, 8, seed=6).detach(),
    )
    valid = torch.ones(b, k, dtype=torch.bool)
    if k == 3:
        valid[0, 2] = False  # a row with fewer negatives: its filler counts nowhere
        if b > 1:
            valid[-1, 1:] = False
    scale = torch.tensor([6.0], requires_grad=True)

    loss, _ = degla_global(img, txt, neg, scale, valid)
    ref = _naive_global(img, txt, neg, valid, scale[0])
    assert torch.allclose(loss, ref, atol=1e-5)
    for g, r in zip(_grads(loss, img, txt, neg, scale), _grads(ref, img, txt, neg, scale), strict=True):
        assert torch.allclose(g, r, atol=1e-5)

    loss, _ = degla_igc(img, txt, neg, scale, valid)
    ref = _naive_grounded(img, txt, neg, valid, scale[0])
    assert torch.allclose(loss, ref, atol=1e-5)
    for g, r in zip(_grads(loss, img, txt, neg, scale), _grads(ref, img, txt, neg, scale), strict=True):
        assert torch.allclose(g, r, atol=1e-5)

    loss, _ = degla_tgc(txt, t_txt, neg, 10.0, valid)
    ref = _naive_grounded(txt, t_txt, neg, valid, 10.0)  # the caption's anchor: the teacher's embedding of it
    assert torch.allclose(loss, ref, atol=1e-5)
    for g, r in zip(_grads(loss, txt, neg), _grads(ref, txt, neg), strict=True):
        assert torch.allclose(g, r, atol=1e-5)

    flat = neg.reshape(b * k, 8)
    loss = degla_distill([img, txt, flat], [t_img, t_txt, t_neg], [None, None, valid.reshape(-1)])
    ref = ((img - t_img) ** 2).sum() + ((txt - t_txt) ** 2).sum()
    ref = ref + sum(((flat[r] - t_neg[r]) ** 2).sum() for r in range(b * k) if valid.reshape(-1)[r])
    assert torch.allclose(loss, ref, atol=1e-5)
    for g, r in zip(_grads(loss, img, txt, neg), _grads(ref, img, txt, neg), strict=True):
        assert torch.allclose(g, r, atol=1e-5)


# ------------------------------------------------------------------------------------------- models


def _pair(tokenizer) -> tuple:
    torch.manual_seed(0)
    cfg = EncoderConfig(objective="clip", embed_dim=16, text=TextTowerConfig(config=TINY_TEXT, max_length=64))
    tower = build_tower(TowerConfig(type="clip", config=TINY_VIT, select_layer=-1))
    return tower, build_text_tower(cfg.text, tokenizer), cfg


def _albef(tokenizer, **kw) -> AlbefModel:
    tower, text, cfg = _pair(tokenizer)
    return AlbefModel(tower, text, cfg, albef=AlbefConfig(fusion_layers=1, fusion_heads=2, **kw)).train()


def _degla(tokenizer, **kw) -> DeglaModel:
    tower, text, cfg = _pair(tokenizer)
    return DeglaModel(tower, text, cfg, degla=DeglaConfig(**kw)).train()


def _batch(model, negatives: bool = False) -> dict:
    torch.manual_seed(1)
    ids, mask = model.text_tower.tokenize(CAPTIONS)
    out = {"pixel_values": torch.randn(4, 3, 32, 32), "input_ids": ids, "attention_mask": mask}
    if negatives:
        out["neg_input_ids"], out["neg_attention_mask"] = model.text_tower.tokenize(
            [n for ns in NEGATIVES for n in ns]
        )
        out["neg_valid"] = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    return out


def _steps(model, batch, n: int) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for i in range(n):
        torch.manual_seed(100 + i)  # the same masks and ITM draws each step: a fixed objective
        out = model(**batch)
        losses.append(float(out.loss.detach()))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        model.after_step()
    return losses


def test_albef_trains_every_part_and_a_few_steps_lower_the_loss(tokenizer):
    model = _albef(tokenizer, momentum=0.5)
    batch = _batch(model)
    pv = batch["pixel_values"]
    assert torch.equal(model.image_parts(pv)[0], model.encode_image(pv))  # ITC trains what retrieval reads
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert torch.equal(model.text_parts(ids, mask)[0], model.encode_text(ids, mask))
    out = model(**batch)
    assert {"itc", "itm", "mlm", "itm_acc", "alpha"} <= set(out.stats)
    out.loss.backward()
    for name, p in model.named_parameters():
        if name.startswith(("albef.", "image_tower.", "text_tower.", "heads.image_proj", "heads.text_proj")):
            assert p.grad is not None, name
    model.zero_grad()
    before = model.momentum.tensors()["albef.itm_head.weight"].clone()
    losses = _steps(model, batch, 8)
    assert losses[-1] < losses[0], losses
    after = model.momentum.tensors()["albef.itm_head.weight"]
    assert not torch.equal(before, after)  # the momentum model follows (after_step)
    assert int(model.steps) == 8


def test_albef_queue_fills_in_order_then_overwrites_the_oldest(tokenizer):
    model = _albef(tokenizer, queue_size=5)
    assert model.queued() == (None, None)
    rows = [F.normalize(torch.randn(3, 16), dim=-1) for _ in range(3)]
    model.enqueue(rows[0], -rows[0])
    img_q, txt_q = model.queued()
    assert torch.equal(img_q, rows[0]) and torch.equal(txt_q, -rows[0])
    model.enqueue(rows[1], -rows[1])  # 6 rows into 5 slots: the first row is overwritten
    img_q, txt_q = model.queued()
    assert img_q.shape == (5, 16) and int(model.queue_ptr) == 1
    assert (
        torch.equal(img_q[0], rows[1][2])
        and torch.equal(img_q[1:3], rows[0][1:])
        and torch.equal(img_q[3:], rows[1][:2])
    )
    batch = _batch(model)
    model(**batch)  # a training forward enqueues the momentum embeddings of its batch
    assert int(model.queue_filled) == 5 and int(model.queue_ptr) == (1 + 4) % 5
    assert torch.equal(_albef(tokenizer).image_queue, torch.zeros(0, 16))  # default: no queue


def test_albef_alpha_warms_up_over_optimiser_steps(tokenizer):
    model = _albef(tokenizer, alpha=0.4, alpha_warmup_steps=4)
    assert model.alpha() == 0.0
    model.steps += 2
    assert math.isclose(model.alpha(), 0.2)
    model.steps += 10
    assert math.isclose(model.alpha(), 0.4)


def test_degla_a_few_steps_lower_the_loss_and_the_teacher_follows(tokenizer):
    model = _degla(tokenizer, momentum=0.5)
    batch = _batch(model, negatives=True)
    out = model(**batch)
    assert {"global_loss", "igc", "tgc", "distill"} <= set(out.stats)
    assert float(out.stats["distill"]) == 0.0  # the teacher starts as the student
    losses = _steps(model, batch, 8)
    assert losses[-1] < losses[0], losses
    assert float(model(**batch).stats["distill"]) > 0.0


@pytest.mark.parametrize("kind", ("albef", "degla"))
def test_saved_folder_is_a_contrastive_pair_and_reloads(tokenizer, tmp_path, kind):
    model = _albef(tokenizer, queue_size=6) if kind == "albef" else _degla(tokenizer)
    batch = _batch(model, negatives=kind == "degla")
    _steps(model, batch, 1)
    model.eval().save_pretrained(tmp_path / kind)
    back = type(model).from_pretrained(tmp_path / kind)
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    plain = ContrastiveModel.from_pretrained(tmp_path / kind)  # what `mllm eval retrieval` loads
    assert type(plain) is ContrastiveModel
    pv = batch["pixel_values"]
    assert torch.allclose(plain.encode_image(pv), model.encode_image(pv), atol=1e-6)
    assert_tower_loads_into_mllm(tmp_path / kind / "image_tower", "clip", tokenizer, model.image_tower)


# ------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ("albef-tiny", "degla-tiny"))
def test_recipes_build_on_geoworld(recipe_world, tmp_path, name):  # noqa: F811
    recipe = check_recipe(name, True, recipe_world, tmp_path)
    assert recipe.stages[0].batch_size == 64 and recipe.stages[0].max_steps == 100  # clip-tiny's


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.encoder.albef.momentum=1.0", "model.encoder.albef.momentum"),
        ("model.encoder.albef.momentum=-0.1", "model.encoder.albef.momentum"),
        ("model.encoder.albef.alpha=1.5", "model.encoder.albef.alpha"),
        ("model.encoder.albef.alpha=-0.1", "model.encoder.albef.alpha"),
        ("model.encoder.albef.mlm_prob=0", "model.encoder.albef.mlm_prob"),
        ("model.encoder.albef.fusion_layers=0", "model.encoder.albef.fusion_layers"),
        ("model.encoder.albef.itm_weight=-1", "model.encoder.albef.itm_weight"),
        ("model.encoder.albef.queue_size=-4", "model.encoder.albef.queue_size"),
        ("model.encoder.albef.queue=5", "model.encoder.albef"),
        ("model.encoder.objective=siglip", "model.encoder.objective"),
        ("model.encoder.degla={}", "model.encoder"),  # DeGLA's section under model.kind albef
    ],
)
def test_bad_albef_configuration_is_refused_when_the_recipe_loads(override, key):
    from mllm.config import load_recipe

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        load_recipe("albef-tiny", [override])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.encoder.degla.momentum=1", "model.encoder.degla.momentum"),
        ("model.encoder.degla.momentum=2.0", "model.encoder.degla.momentum"),
        ("model.encoder.degla.n_negatives=0", "model.encoder.degla.n_negatives"),
        ("model.encoder.degla.n_negatives=4", "model.encoder.degla.n_negatives"),
        ("model.encoder.degla.tgc_scale=0", "model.encoder.degla.tgc_scale"),
        ("model.encoder.degla.igc_weight=-0.5", "model.encoder.degla.igc_weight"),
        ("model.encoder.albef={}", "model.encoder"),
    ],
)
def test_bad_degla_configuration_is_refused_when_the_recipe_loads(override, key):
    from mllm.config import load_recipe

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe("degla-tiny", [override])


def test_albef_section_is_refused_under_model_kind_contrastive():
    from mllm.config import load_recipe

    with pytest.raises(ConfigError, match=r"model\.encoder.*albef"):
        load_recipe("clip-tiny", ["model.encoder.albef={}"])


def test_degla_global_on_two_gloo_ranks_equals_one_process(tmp_path):
    """Each rank holds half the batch; the mean of the ranks' losses = the loss on the whole batch; each
    rank's feature gradients / world = the whole-batch gradient's slice; the scale's gradient averaged
    over ranks = the whole-batch one (what DDP's averaging makes of them)."""
    import subprocess
    import sys
    from pathlib import Path

    import _dist_albef_worker as w
    from helpers import subprocess_env
    from safetensors.torch import load_file

    from mllm.training.distributed import free_port

    repo = Path(__file__).resolve().parents[1]
    world = 2
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(repo / "tests" / "_dist_albef_worker.py"), str(tmp_path)],
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
    x = {k: full[k].clone().requires_grad_() for k in ("img", "txt", "neg", "scale")}
    ref = _naive_global(x["img"], x["txt"], x["neg"], full["valid"], x["scale"][0])
    grads = dict(zip(x, torch.autograd.grad(ref, list(x.values())), strict=True))
    torch.testing.assert_close(
        sum(rk["loss"] for rk in ranks)[0] / world, ref.detach(), rtol=1e-10, atol=1e-10
    )
    b = w.LOCAL_B
    for r, rk in enumerate(ranks):
        for k in ("img", "txt", "neg"):
            torch.testing.assert_close(
                rk[f"grad.{k}"] / world, grads[k][r * b : (r + 1) * b], rtol=1e-9, atol=1e-12
            )
    torch.testing.assert_close(
        sum(rk["grad.scale"] for rk in ranks) / world, grads["scale"], rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("name", ("albef-tiny", "degla-tiny"))
def test_init_from_a_trained_clip_pair_starts_the_ema_copy_as_that_model(tokenizer, tmp_path, name):
    """DeGLA fine-tunes a pre-trained CLIP (its first teacher is that model); both kinds start from any pair
    folder given as model.init_from, and continue from a folder of their own kind."""
    from mllm.config import load_recipe
    from mllm.families import get_family

    tower, text, cfg = _pair(tokenizer)
    clip = ContrastiveModel(tower, text, cfg).eval()
    clip.save_pretrained(tmp_path / "clip")
    recipe = load_recipe(name, [f"model.init_from={tmp_path / 'clip'}", f"extra.world={tmp_path}"])
    model = get_family(recipe.model.kind).build(recipe.model, tmp_path / "run", [], 0)
    assert type(model) is (AlbefModel if name == "albef-tiny" else DeglaModel) and model.training
    pv = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.encode_image(pv), clip.encode_image(pv), atol=1e-6)
    ema = model.momentum if name == "albef-tiny" else model.teacher
    for k, v in ema.tensors().items():
        if not k.startswith("albef."):
            assert torch.equal(v, model.state_dict()[k]), k
    model.eval().save_pretrained(tmp_path / "again")
    again = get_family(recipe.model.kind).build(
        load_recipe(name, [f"model.init_from={tmp_path / 'again'}", f"extra.world={tmp_path}"]).model,
        tmp_path / "run",
        [],
        0,
    )
    assert type(again) is type(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_negatives_dataset_draws_each_rows_own_negatives_and_marks_fillers(tokenizer, recipe_world, tmp_path):  # noqa: F811
    import json
    import random

    from mllm.data.batch import is_skipped
    from mllm.data.negatives import NegativesCaptionCollator, NegativesCaptionDataset
    from mllm.data.records import DataError

    rows = [json.loads(ln) for ln in (recipe_world / "captions.jsonl").read_text().splitlines()]
    rows[1]["negatives"] = {"attribute": rows[1]["negatives"]["attribute"]}  # a scene with one negative
    rows[2]["negatives"] = {}
    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tower, text, _ = _pair(tokenizer)
    ds = NegativesCaptionDataset(path, recipe_world, tower.preprocess, "long", n_negatives=3)
    random.seed(0)
    first = ds[0]
    own = [v for v in rows[0]["negatives"].values() if v]
    assert first["text"] == rows[0]["long"] and sorted(first["negatives"]) == sorted(own[:3]) == sorted(
        set(own)
    )
    assert ds[1]["negatives"] == [rows[1]["negatives"]["attribute"]]
    with pytest.raises(DataError, match="line 3.*no negative captions"):
        ds[2]
    skipping = NegativesCaptionDataset(path, recipe_world, tower.preprocess, skip_bad_samples=True)
    assert is_skipped(skipping[2]) and not is_skipped(skipping[1])
    batch = NegativesCaptionCollator(text.tokenize)([first, ds[1]])
    k = len(first["negatives"])
    assert batch["neg_input_ids"].shape[0] == 2 * k and batch["neg_valid"].shape == (2, k)
    assert batch["neg_valid"][0].all() and batch["neg_valid"][1].tolist() == [True] + [False] * (k - 1)
    one = NegativesCaptionDataset(path, recipe_world, tower.preprocess, n_negatives=1)
    assert len({one[0]["negatives"][0] for _ in range(30)}) == len(own) > 1  # a fresh draw per fetch


@pytest.mark.slow
@pytest.mark.parametrize("kind", ("albef", "degla"))
def test_killed_and_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, recipe_world, kind):  # noqa: F811
    """Plain torch, killed after step 3 (checkpoint at 2) and resumed: the loss sequence, the EMA copy (and
    ALBEF's step count, which drives α's warm-up) end where an uninterrupted run's do. The EMA tensors are
    buffers, which the checkpoint carries; the masks and ITM draws come from the restored RNG."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from helpers import subprocess_env

    repo = Path(__file__).resolve().parents[1]
    section = {"albef": {"momentum": 0.5, "alpha_warmup_steps": 3, "fusion_layers": 1, "fusion_heads": 2}}
    if kind == "degla":
        section = {"degla": {"momentum": 0.5, "n_negatives": 2}}
    recipe = {
        "name": f"{kind}-resume",
        "model": {
            "kind": kind,
            "tower": {"type": "clip", "config": {**TINY_VIT, "image_size": 64}, "select_layer": -1},
            "tokenizer": {"vocab_size": 300},
            "encoder": {"embed_dim": 16, "text": {"config": TINY_TEXT, "max_length": 64}, **section},
        },
        "stages": [
            {
                "name": kind,
                "kind": kind,
                "data": {"json": str(recipe_world / "captions.jsonl"), "images": str(recipe_world)},
                "lr": 1e-3,
                "batch_size": 4,
                "max_steps": 4,
                "warmup_ratio": 0.0,
            }
        ],
        "engine": {"backend": "torch", "precision": "fp32", "seed": 0, "checkpoint_every": 2, "keep_last": 2},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))

    def run(out: Path, fault: str | None) -> subprocess.CompletedProcess:
        env = subprocess_env(repo, OMP_NUM_THREADS="1", **({"MLLM_FAULT": fault} if fault else {}))
        cmd = [sys.executable, "-m", "mllm.cli", "train", "--recipe", str(path), "--out", str(out)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)

    def losses(out: Path) -> list[float]:
        return [json.loads(ln)["loss"] for ln in (out / kind / "metrics.jsonl").read_text().splitlines()]

    ref = run(tmp_path / "ref", None)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert run(tmp_path / "cut", "after_step:3").returncode == -9
    done = run(tmp_path / "cut", None)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["stages"][kind]["resumed_from"] == 2
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "ref"), rel=1e-5)
    cls = AlbefModel if kind == "albef" else DeglaModel
    a = cls.from_pretrained(tmp_path / "ref" / kind / "final").state_dict()
    b = cls.from_pretrained(tmp_path / "cut" / kind / "final").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    if kind == "albef":
        assert int(a["steps"]) == 4
