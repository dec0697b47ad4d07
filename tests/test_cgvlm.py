"""CG-VLM (mllm.cgvlm): the align stage's contrastive term against a naive transcription of the formula (values
and gradients, fp32, several batch sizes), weight 0 leaving the align stage's loss bit for bit unchanged, the
wrapped model's loss = next-token loss + weight * the naive term, and the `cgvlm:` section refused at recipe
load where it is wrong."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mllm.cgvlm import CgVlmAlign, CgVlmConfig, cgvlm_loss, with_cgvlm
from mllm.chat import IGNORE_INDEX
from mllm.config import ConfigError, load_recipe

SIZES = (1, 3, 7)


def naive_cgvlm(img_tokens, txt_tokens, mask, tau):
    """v_i = normalise(1/N sum_n x_in), t_i = normalise(sum_k m_ik e_ik / sum_k m_ik);
    L = 1/2 [mean_i -log softmax_j(v_i.t_j / tau)_i + mean_i -log softmax_j(t_i.v_j / tau)_i]."""
    b = img_tokens.shape[0]
    v = [img_tokens[i].sum(0) / img_tokens.shape[1] for i in range(b)]
    v = [x / x.norm() for x in v]
    t = []
    for i in range(b):
        s = sum(txt_tokens[i, k] for k in range(txt_tokens.shape[1]) if mask[i, k])
        s = s / int(mask[i].sum())
        t.append(s / s.norm())
    total = 0.0
    for i in range(b):
        li = torch.stack([v[i] @ t[j] / tau for j in range(b)])
        lt = torch.stack([t[i] @ v[j] / tau for j in range(b)])
        total = total - torch.log(torch.exp(li[i]) / torch.exp(li).sum()) / (2 * b)
        total = total - torch.log(torch.exp(lt[i]) / torch.exp(lt).sum()) / (2 * b)
    return total


@pytest.mark.parametrize("b", SIZES)
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_loss_matches_the_formula_values_and_gradients(b, tau):
    g = torch.Generator().manual_seed(b)
    img = torch.randn(b, 4, 6, generator=g)
    txt = torch.randn(b, 5, 6, generator=g)
    mask = torch.rand(b, 5, generator=g) > 0.4
    mask[:, 2] = True  # every row has a caption token
    a = [img.clone().requires_grad_(), txt.clone().requires_grad_()]
    n = [img.clone().requires_grad_(), txt.clone().requires_grad_()]
    la, stats = cgvlm_loss(a[0], a[1], mask, tau)
    ln = naive_cgvlm(n[0], n[1], mask, tau)
    la.backward()
    ln.backward()
    assert torch.allclose(la, ln, atol=1e-5, rtol=1e-5), (float(la), float(ln))
    for x, y in zip(a, n):
        assert torch.allclose(x.grad, y.grad, atol=1e-6, rtol=1e-4)
    # padding positions (mask 0) get no gradient: only the caption is pooled
    assert float(a[1].grad[~mask].abs().max()) == 0.0
    assert {"acc_i2t", "acc_t2i"} <= set(stats)


def test_a_sample_without_caption_tokens_is_refused():
    with pytest.raises(ValueError, match="no caption tokens"):
        cgvlm_loss(torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.tensor([[1, 0, 0, 0, 0], [0] * 5]), 0.1)


def _batch(model, b: int = 3, caption: int = 5):
    """B samples: N image placeholders, a one-token prompt, then a labelled caption of `caption` tokens."""
    g = torch.Generator().manual_seed(0)
    n = model.num_image_tokens
    ids = torch.randint(5, 200, (b, n + 1 + caption), generator=g)
    ids[:, :n] = model.image_token_id
    labels = ids.clone()
    labels[:, : n + 1] = IGNORE_INDEX
    labels[0, -1] = IGNORE_INDEX  # rows of different caption lengths
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": torch.randn(b, 3, 32, 32, generator=g),
    }


def test_weight_zero_is_the_align_stage_bit_for_bit(tiny_model):
    assert with_cgvlm(tiny_model, None) is tiny_model
    assert with_cgvlm(tiny_model, CgVlmConfig(weight=0.0)) is tiny_model
    batch = _batch(tiny_model)
    plain = tiny_model(**batch).loss
    wrapped = CgVlmAlign(tiny_model, CgVlmConfig(weight=0.0))(**batch).loss
    assert torch.equal(plain, wrapped)


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_the_wrapped_loss_is_next_token_plus_weight_times_the_formula(tiny_model, weight):
    module = with_cgvlm(tiny_model, CgVlmConfig(weight=weight, temperature=0.2))
    assert isinstance(module, CgVlmAlign)
    # the module's parameters are the model's own, by the same names (trainable prefixes, checkpoints)
    assert [k for k, _ in module.named_parameters()] == [k for k, _ in tiny_model.named_parameters()]
    batch = _batch(tiny_model)
    out = module(**batch)
    with torch.no_grad():
        lm_loss = tiny_model(**batch).loss
        img = tiny_model.encode_images(batch["pixel_values"])
        caption = batch["labels"] != IGNORE_INDEX
        emb = tiny_model.lm.get_input_embeddings()(batch["input_ids"])
        want = lm_loss + weight * naive_cgvlm(img, emb, caption, 0.2)
    assert torch.allclose(out.loss, want, atol=1e-5), (float(out.loss), float(want))
    assert {"loss_lm", "loss_con", "acc_i2t", "acc_t2i"} <= set(out.stats)
    # only the projector trains in `align`: it receives the contrastive gradient too
    for p in tiny_model.parameters():
        p.requires_grad_(False)
    for p in tiny_model.projector.parameters():
        p.requires_grad_(True)
    lm_only = torch.autograd.grad(tiny_model(**batch).loss, list(tiny_model.projector.parameters()))
    both = torch.autograd.grad(module(**batch).loss, list(tiny_model.projector.parameters()))
    assert any(not torch.allclose(x, y) for x, y in zip(lm_only, both))


def test_packed_rows_are_refused(tiny_model):
    batch = _batch(tiny_model)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    batch["attention_mask"] = None
    with pytest.raises(ValueError, match="packed"):
        CgVlmAlign(tiny_model, CgVlmConfig())(**batch)


def test_cgvlm_config_is_checked_at_recipe_load():
    ok = load_recipe("cgvlm-tiny")
    assert ok.stage("align").cgvlm == CgVlmConfig(weight=1.0, temperature=0.07)
    assert load_recipe("cgvlm-tiny", ["stages.align.cgvlm.weight=0"]).stage("align").cgvlm.weight == 0
    for override, key in [
        ("stages.align.cgvlm.weight=-0.5", "cgvlm.weight"),
        ("stages.align.cgvlm.weight=.nan", "cgvlm.weight"),
        ("stages.align.cgvlm.temperature=0", "cgvlm.temperature"),
        ("stages.align.cgvlm.tau=1", "tau"),
        ("stages.instruct.cgvlm={weight: 1.0}", "stages.instruct.cgvlm"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
            load_recipe("cgvlm-tiny", [override])
        assert "\n" not in str(e.value)


def test_naive_reference_is_not_trivially_equal():
    """The reference can tell a wrong pooling apart: pooling padding too changes the value."""
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(4, 3, 5, generator=g), torch.randn(4, 6, 5, generator=g)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, :2] = True
    full = torch.ones_like(mask)
    assert not torch.allclose(naive_cgvlm(img, txt, mask, 0.1), naive_cgvlm(img, txt, full, 0.1))
    assert F.normalize(img.mean(1), dim=-1).shape == (4, 5)


def test_the_align_stage_through_the_runner(tmp_path):
    """The real path (recipe -> runner -> conversation task): `cgvlm.weight: 0` logs the same losses as no
    section at all, bit for bit; weight 1 trains with both terms logged and changes the projector's step."""
    import json

    from helpers import tiny_recipe, write_tiny_world

    from mllm.config import recipe_from_dict
    from mllm.training.runner import train_recipe

    world = write_tiny_world(tmp_path / "w", n=16)

    def run(name: str, cgvlm: dict | None) -> list[dict]:
        tree = tiny_recipe(world, backend="torch", zero=None, steps=(2, 0))
        tree["stages"] = tree["stages"][:1]
        if cgvlm is not None:
            tree["stages"][0]["cgvlm"] = cgvlm
        train_recipe(recipe_from_dict(tree), tmp_path / name, log=lambda *_: None)
        lines = (tmp_path / name / "align" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(ln) for ln in lines]

    plain, zero, on = run("plain", None), run("zero", {"weight": 0.0}), run("on", {"weight": 1.0})
    assert [r["loss"] for r in plain] == [r["loss"] for r in zero]
    assert {"loss_lm", "loss_con", "acc_i2t", "acc_t2i"} <= set(on[-1]["stats"])
    # step 1's loss: the same LM loss (same weights, same batch), plus the contrastive term
    first = on[0]["stats"]
    assert first["loss_lm"] == pytest.approx(plain[0]["loss"], rel=1e-5)
    assert on[0]["loss"] == pytest.approx(first["loss_lm"] + first["loss_con"], rel=1e-5)
    # ... and its gradient moved the projector elsewhere: step 2's LM loss differs from the plain run's
    assert on[1]["stats"]["loss_lm"] != plain[1]["loss"]
