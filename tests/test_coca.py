"""CoCa and SyCoCa (encoders.coca): each loss term against a naive transcription of its formula, the
attentional pooler, the model's total loss and gradients, a tiny train, saving and loading through the
contrastive family, the recipes, and bad configuration refused when the recipe loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TOWER
from PIL import Image

from encoders.coca import (
    AttentionalPooler,
    CocaModel,
    attentive_mask,
    caption_loss,
    is_coca_dir,
    mask_patches,
    mim_loss,
    patchify,
    sincos_2d,
)
from encoders.coca_config import CocaConfig, MimConfig
from encoders.contrastive import ContrastiveModel, EncoderConfig
from encoders.objectives import get_objective
from encoders.text_tower import TextTowerConfig, build_text_tower
from encoders.towers import TowerConfig, build_tower
from mllm.config import ConfigError, load_recipe, recipe_from_dict, to_dict
from mllm.families import get_family

REPO = Path(__file__).resolve().parents[1]
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=96,
)
BATCHES = (1, 3, 7)  # 1, and sizes that are no multiple of anything


def _model(tokenizer, mim: bool = True, **coca) -> CocaModel:
    torch.manual_seed(0)
    coca = dict(dict(n_queries=5, heads=2), **coca)
    if mim:
        coca["mim"] = MimConfig(heads=2, layers=1, mask_ratio=0.5)
    cfg = EncoderConfig(
        embed_dim=16, text=TextTowerConfig(config=TINY_TEXT, max_length=96), coca=CocaConfig(**coca)
    )
    tower = build_tower(TowerConfig(type="clip", config=TINY_TOWER, select_layer=-1))
    return CocaModel(tower, build_text_tower(cfg.text, tokenizer), cfg)


def _batch(model: CocaModel, b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pv = torch.randn(b, 3, 32, 32, generator=g)
    words = ["a red circle", "two blue squares left of a green triangle", "yellow", "a big square"]
    ids, mask = model.text_tower.tokenize([words[i % len(words)] for i in range(b)])
    return pv, ids, mask


# ------------------------------------------------------------------------------ naive transcriptions


def _naive_caption_loss(logits, ids, mask, eps=0.0):
    """−(1/|T|) Σ over real target tokens y_t of [(1−ε)·log p(y_t | y_<t) + ε·mean_v log p(v | y_<t)]."""
    terms = []
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if mask[b, t + 1]:
                logp = torch.log_softmax(logits[b, t].double(), -1)
                terms.append(-((1 - eps) * logp[ids[b, t + 1]] + eps * logp.mean()))
    return torch.stack(terms).mean()


def _naive_patches(pixels, grid):
    b, c, h, _ = pixels.shape
    p = h // grid
    out = torch.zeros(b, grid * grid, p * p * c, dtype=pixels.dtype)
    for i in range(b):
        for y in range(grid):
            for x in range(grid):
                vals = [
                    pixels[i, ch, y * p + r, x * p + q] for r in range(p) for q in range(p) for ch in range(c)
                ]
                out[i, y * grid + x] = torch.stack(vals)
    return out


def _naive_mim_loss(pred, target, mask, norm_pix):
    """(1/|M|) Σ_{masked (b, n)} (1/P) Σ_j (pred − t̂)², t̂ = (t − mean t) / sqrt(var_unbiased t + 1e-6)."""
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        for n in range(pred.shape[1]):
            if not mask[b, n]:
                continue
            t = target[b, n].double()
            if norm_pix:
                mu = t.sum() / len(t)
                var = ((t - mu) ** 2).sum() / (len(t) - 1)
                t = (t - mu) / torch.sqrt(var + 1e-6)
            total = total + ((pred[b, n].double() - t) ** 2).sum() / len(t)
            count += 1
    return total / count


# ------------------------------------------------------------------------------ the loss terms


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_caption_loss_matches_the_naive_formula_values_and_gradients(b, eps):
    g = torch.Generator().manual_seed(b)
    t, v = 9, 11
    ids = torch.randint(v, (b, t), generator=g)
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    logits = torch.randn(b, t, v, generator=g, requires_grad=True)
    ours = caption_loss(logits, ids, mask, eps)
    (g1,) = torch.autograd.grad(ours, logits)
    ref = _naive_caption_loss(logits, ids, mask, eps)
    (g2,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(ours.double(), ref, atol=1e-5)
    assert torch.allclose(g1.double(), g2.double(), atol=1e-6)
    assert g1[:, -1].abs().sum() == 0  # the last position predicts nothing


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("select", ["most", "least"])
def test_attentive_mask_picks_the_most_or_least_attended_patches(b, select):
    g = torch.Generator().manual_seed(b)
    scores = torch.randn(b, 16, generator=g)
    mask = attentive_mask(scores, 5, select)
    for i in range(b):
        order = sorted(range(16), key=lambda j: float(scores[i, j]), reverse=select == "most")
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == set(order[:5])
    rnd = attentive_mask(scores, 5, "random", generator=g)
    assert rnd.sum(1).tolist() == [5] * b
    with pytest.raises(ValueError, match="n_mask"):
        attentive_mask(scores, 16, "most")


@pytest.mark.parametrize("b", BATCHES)
def test_patchify_and_mask_patches_match_loops(b):
    g = torch.Generator().manual_seed(b)
    pixels = torch.randn(b, 3, 8, 8, generator=g)
    assert torch.equal(patchify(pixels, 4), _naive_patches(pixels, 4))
    mask = torch.rand(b, 16, generator=g) < 0.5
    out = mask_patches(pixels, mask, 4)
    for i in range(b):
        for n in range(16):
            y, x = divmod(n, 4)
            patch = out[i, :, 2 * y : 2 * y + 2, 2 * x : 2 * x + 2]
            want = (
                torch.zeros_like(patch) if mask[i, n] else pixels[i, :, 2 * y : 2 * y + 2, 2 * x : 2 * x + 2]
            )
            assert torch.equal(patch, want)


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("norm_pix", [True, False])
def test_mim_loss_matches_the_naive_formula_values_and_gradients(b, norm_pix):
    g = torch.Generator().manual_seed(10 + b)
    pred = torch.randn(b, 16, 12, generator=g, requires_grad=True)
    target = torch.randn(b, 16, 12, generator=g) * 3 + 1
    mask = attentive_mask(torch.randn(b, 16, generator=g), 7, "most")
    ours = mim_loss(pred, target, mask, norm_pix)
    (g1,) = torch.autograd.grad(ours, pred)
    ref = _naive_mim_loss(pred, target, mask, norm_pix)
    (g2,) = torch.autograd.grad(ref, pred)
    assert torch.allclose(ours.double(), ref, rtol=1e-5)
    assert torch.allclose(g1.double(), g2.double(), atol=1e-6)
    assert g1[~mask].abs().sum() == 0  # visible patches are not scored


def test_sincos_2d_codes_row_and_column():
    pos = sincos_2d(3, 8)
    assert pos.shape == (9, 8)
    # token 5 = row 1, column 2; frequencies 1 and 1/100 per axis
    y, x = 1.0, 2.0
    want = [math.sin(y), math.sin(y / 100), math.cos(y), math.cos(y / 100)]
    want += [math.sin(x), math.sin(x / 100), math.cos(x), math.cos(x / 100)]
    assert torch.allclose(pos[5], torch.tensor(want), atol=1e-6)


# ------------------------------------------------------------------------------ the pooler and the model


@pytest.mark.parametrize("n_queries", [1, 6])
def test_attentional_pooler_shapes_and_gradients(n_queries):
    torch.manual_seed(0)
    pool = AttentionalPooler(width=16, context_dim=24, n_queries=n_queries, heads=4)
    tokens = torch.randn(3, 10, 24, requires_grad=True)
    out = pool(tokens)
    assert out.shape == (3, n_queries, 16)
    out.pow(2).sum().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    for name, p in pool.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # each query reads the image: a different image gives a different output
    assert not torch.allclose(pool(tokens[:1]), pool(tokens[1:2]))


@pytest.mark.parametrize("b", [1, 3])
def test_model_loss_is_the_weighted_sum_of_its_terms_and_each_is_the_formula(tokenizer, b):
    model = _model(tokenizer, contrastive_weight=0.5, caption_weight=1.5)
    model.cfg.coca.mim.weight = 0.7
    pv, ids, mask = _batch(model, b)
    out = model(pixel_values=pv, input_ids=ids, attention_mask=mask)
    s = out.stats
    assert torch.allclose(
        out.loss, 0.5 * s["loss_con"] + 1.5 * s["loss_cap"] + 0.7 * s["loss_mim"], atol=1e-5
    )
    with torch.no_grad():
        img, txt = model.encode_image(pv), model.encode_text(ids, mask)
        con, _ = get_objective("clip")(img, txt, model.logit_scale(), None)
        hidden, _ = model.image_tower.final_outputs(pv)
        _, states = model.text_tower(ids, mask)
        logits = model.coca.decoder(states, model.coca.cap_pool(hidden))
    assert torch.allclose(s["loss_con"], con, atol=1e-5)
    assert torch.allclose(s["loss_cap"].double(), _naive_caption_loss(logits, ids, mask), atol=1e-5)
    # the image embedding is the one-query pooler's, not the tower's pooler output
    pooled = F.normalize(model.heads.image_proj(model.coca.con_pool(hidden)[:, 0]), dim=-1)
    assert torch.allclose(img, pooled, atol=1e-6)


def test_gradients_reach_every_part(tokenizer):
    model = _model(tokenizer)
    pv, ids, mask = _batch(model, 4)
    model(pixel_values=pv, input_ids=ids, attention_mask=mask).loss.backward()
    unused = ("image_tower.model.post_layernorm.",)  # the tower's own pooler: CoCa pools itself
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not name.startswith(unused):
            assert p.grad.abs().sum() > 0, name
    assert {n.split(".")[1] for n, _ in model.named_parameters() if n.startswith("coca.")} == {
        "con_pool",
        "cap_pool",
        "decoder",
        "mim",
    }


def test_attentive_masking_masks_the_text_similar_patches(tokenizer):
    pv = None
    gaps = {}
    for select in ("most", "least"):
        model = _model(tokenizer)
        model.cfg.coca.mim.select = select
        if pv is None:
            pv, ids, mask = _batch(model, 3)
        with torch.no_grad():
            gaps[select] = float(
                model(pixel_values=pv, input_ids=ids, attention_mask=mask).stats["mim_score_gap"]
            )
    assert gaps["most"] > 0 > gaps["least"]


def test_a_tiny_train_lowers_every_loss_on_a_fixed_batch(tokenizer):
    model = _model(tokenizer).train()
    pv, ids, mask = _batch(model, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = last = None
    for _ in range(15):
        out = model(pixel_values=pv, input_ids=ids, attention_mask=mask)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        last = {k: float(out.stats[k]) for k in ("loss_con", "loss_cap", "loss_mim")} | {
            "loss": float(out.loss.detach())
        }
        first = first or last
    assert last["loss"] < 0.8 * first["loss"], (first, last)
    for k in ("loss_cap", "loss_mim"):
        assert last[k] < first[k], (k, first, last)


def test_captions_are_generated(tokenizer):
    model = _model(tokenizer, mim=False).eval()
    pv, _, _ = _batch(model, 2)
    caps = model.generate_captions(pv, max_new_tokens=4)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)


def test_save_load_through_the_contrastive_family(tokenizer, tmp_path):
    model = _model(tokenizer).eval()
    pv, ids, mask = _batch(model, 3)
    model.save_pretrained(tmp_path / "m")
    assert is_coca_dir(tmp_path / "m") and (tmp_path / "m" / "coca.safetensors").is_file()
    loaded = get_family("contrastive").load(tmp_path / "m")
    assert isinstance(loaded, CocaModel) and loaded.cfg.coca == model.cfg.coca
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(pv), model.encode_image(pv), atol=1e-6)
        assert torch.allclose(loaded.encode_text(ids, mask), model.encode_text(ids, mask), atol=1e-6)
        a = model(pixel_values=pv, input_ids=ids, attention_mask=mask).stats["loss_cap"]
        assert torch.allclose(
            loaded(pixel_values=pv, input_ids=ids, attention_mask=mask).stats["loss_cap"], a
        )
    # the tower is an ordinary HF tower (what a MultimodalLM takes as model.tower.path)
    tower = build_tower(TowerConfig(type="clip", path=str(tmp_path / "m" / "image_tower"), select_layer=-1))
    assert tower.output_size == model.image_tower.output_size
    # a plain pair still loads as one
    plain = ContrastiveModel(
        model.image_tower, model.text_tower, EncoderConfig(embed_dim=16, text=model.cfg.text)
    )
    plain.save_pretrained(tmp_path / "p")
    assert not is_coca_dir(tmp_path / "p")
    assert type(get_family("contrastive").load(tmp_path / "p")) is ContrastiveModel


def test_embed_images_uses_the_coca_pooler(tokenizer):
    model = _model(tokenizer, mim=False).eval()
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    emb = model.embed_images(images)
    with torch.no_grad():
        want = model.encode_image(model.image_tower.preprocess(images))
    assert torch.allclose(emb, want, atol=1e-6)


# ------------------------------------------------------------------------------ recipes and configuration


def _tree(name: str) -> dict:
    return to_dict(load_recipe(REPO / "train/recipes" / f"{name}.yaml"))


def test_recipes_are_clip_tiny_plus_the_coca_section():
    base = _tree("clip-tiny")
    for name, mim in (("coca-tiny", False), ("sycoca-tiny", True)):
        tree = _tree(name)
        coca = tree["model"]["encoder"].pop("coca")
        assert coca["caption_weight"] == 2.0 and coca["contrastive_weight"] == 1.0
        assert (coca["mim"] is not None) == mim
        base["model"]["encoder"]["coca"] = None
        tree["model"]["encoder"]["coca"] = None
        tree["name"] = base["name"]
        assert tree == base, name


@pytest.mark.parametrize(
    "coca, key",
    [
        ({"caption_weight": -1.0}, "model.encoder.coca.caption_weight"),
        ({"contrastive_weight": float("nan")}, "model.encoder.coca.contrastive_weight"),
        ({"n_queries": 0}, "model.encoder.coca.n_queries"),
        ({"heads": 0}, "model.encoder.coca.heads"),
        ({"multimodal_layers": 0}, "model.encoder.coca.multimodal_layers"),
        ({"label_smoothing": 1.0}, "model.encoder.coca.label_smoothing"),
        ({"mim": {"mask_ratio": 1.0}}, "model.encoder.coca.mim.mask_ratio"),
        ({"mim": {"mask_ratio": 0}}, "model.encoder.coca.mim.mask_ratio"),
        ({"mim": {"select": "top"}}, "model.encoder.coca.mim.select"),
        ({"mim": {"weight": -0.5}}, "model.encoder.coca.mim.weight"),
        ({"mim": {"layers": 0}}, "model.encoder.coca.mim.layers"),
        ({"captionweight": 1.0}, "model.encoder.coca: unknown key"),
    ],
)
def test_bad_config_is_refused_when_the_recipe_loads_naming_the_key(coca, key):
    tree = json.loads(json.dumps(load_recipe_tree()))
    tree["model"]["encoder"]["coca"] = coca
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        recipe_from_dict(tree)
    assert "\n" not in str(e.value)


def test_an_objective_that_needs_token_features_is_refused_with_coca():
    tree = load_recipe_tree()
    tree["model"]["encoder"].update(objective="filip", coca={})
    with pytest.raises(ConfigError, match=r"model\.encoder\.coca: .*filip"):
        recipe_from_dict(tree)


def test_heads_that_do_not_divide_the_widths_are_refused(tokenizer):
    with pytest.raises(ValueError, match=r"model\.encoder\.coca\.heads"):
        _model(tokenizer, mim=False, heads=3)


def load_recipe_tree() -> dict:
    import yaml

    return yaml.safe_load((REPO / "mllm/recipes/coca-tiny.yaml").read_text())


def test_the_contrastive_stage_trains_coca_end_to_end(tmp_path):
    from mllm.data.geoworld import write_world
    from mllm.training.runner import train_recipe

    world = tmp_path / "w"
    write_world(world, seed=1, n=16)
    tree = load_recipe_tree()
    tree["model"]["tower"]["config"] = TINY_TOWER
    tree["model"]["encoder"].update(
        embed_dim=16,
        text={"config": TINY_TEXT, "max_length": 96},
        coca={"n_queries": 4, "heads": 2, "mim": {"heads": 2, "layers": 1}},
    )
    tree["model"]["tokenizer"] = {"vocab_size": 300}
    tree["extra"]["world"] = str(world)
    tree["stages"][0].update(batch_size=4, max_steps=2)
    tree["engine"]["checkpoint_every"] = 0
    recipe = recipe_from_dict(tree)
    train_recipe(recipe, tmp_path / "run")
    final = tmp_path / "run" / "contrastive" / "final"
    assert is_coca_dir(final)
    lines = [json.loads(x) for x in (tmp_path / "run/contrastive/metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and {"loss_cap", "loss_mim", "loss_con"} <= set(lines[0]["stats"])
    assert "coca" in lines[0]["lr"]  # the stage trains the coca parts


def test_a_coca_recipe_started_from_a_trained_pair_gets_fresh_coca_parts(tokenizer, tmp_path):
    from mllm.families.contrastive import build_contrastive_model

    pair = _model(tokenizer, mim=False)
    plain = ContrastiveModel(
        pair.image_tower, pair.text_tower, EncoderConfig(embed_dim=16, text=pair.cfg.text)
    )
    plain.save_pretrained(tmp_path / "clip")
    tree = load_recipe_tree()
    tree["model"]["init_from"] = str(tmp_path / "clip")
    tree["model"]["encoder"]["coca"] = {"n_queries": 3, "heads": 2}
    model = build_contrastive_model(recipe_from_dict(tree).model, tmp_path / "run", [], seed=0)
    assert isinstance(model, CocaModel) and model.cfg.coca.n_queries == 3
    for k, v in plain.image_tower.state_dict().items():
        assert torch.equal(model.image_tower.state_dict()[k], v), k


@pytest.mark.parametrize("recipe", ["tips-tiny", "cloc-tiny"])
def test_coca_on_another_family_is_refused(recipe):
    import yaml

    tree = yaml.safe_load((REPO / "mllm/recipes" / f"{recipe}.yaml").read_text())
    tree["model"]["encoder"]["coca"] = {}
    with pytest.raises(ConfigError, match=r"model\.encoder\.coca is an option of model\.kind contrastive"):
        recipe_from_dict(tree)


def test_two_gloo_ranks_match_one_process_on_the_whole_batch(tokenizer, tmp_path):
    """Data-parallel CoCa + TG-MIM: the mean over ranks of each rank's loss and gradients is the one-process
    loss and gradients on the gathered batch, with captions of different lengths on the two ranks."""
    import socket
    import subprocess
    import sys

    from helpers import subprocess_env
    from safetensors.torch import load_file, save_file

    _model(tokenizer).save_pretrained(tmp_path / "model")
    model = CocaModel.from_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(5)
    words = ["a red circle", "yellow", "two blue squares left of a big green triangle near a circle", "a"]
    ids, mask = model.text_tower.tokenize(words[:3] + words[1:2] + words[3:] + words[:1])  # 6 = 2 x 3
    batch = {"pixel_values": torch.randn(6, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask}
    save_file(batch, str(tmp_path / "batch.safetensors"))
    out = model(**batch)
    out.loss.backward()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "_dist_coca_worker.py"), str(tmp_path)],
            env=subprocess_env(REPO, RANK=str(r), LOCAL_RANK=str(r), OMP_NUM_THREADS="1", **env),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    for r, p in enumerate(procs):
        try:
            log, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"rank {r} timed out")
        assert p.returncode == 0, f"rank {r} failed:\n{log}"
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert mask[:3].sum() != mask[3:].sum()  # the ranks' token counts differ
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, out.loss.detach(), atol=1e-5)
    for n, p in model.named_parameters():
        mean = (ranks[0][f"grad.{n}"] + ranks[1][f"grad.{n}"]) / 2
        assert torch.allclose(mean, p.grad, atol=1e-5, rtol=1e-4), n
