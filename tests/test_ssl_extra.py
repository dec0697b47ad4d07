"""The self-supervised tower's other objectives (encoders.ssl.tower_objectives): SupCon and SwAV against
naive transcriptions of their papers' formulas (loops over anchors / views; values and gradients in fp32
and fp64; batch sizes 1, 2, 5, 13), the scene-graph labels SupCon reads, the model kind `ssl` training and
saving with each, and bad options refused when the recipe loads, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from encoders.common import ConfigError
from encoders.ssl.augment import Augmenter
from encoders.ssl.config import AugmentConfig, SSLConfig
from encoders.ssl.model import SSLModel
from encoders.ssl.supcon import supcon_loss
from encoders.ssl.swav import swav_loss
from encoders.towers import TowerConfig, build_tower
from mllm.data.views import collate_views

REPO = Path(__file__).resolve().parents[1]
BATCHES = [1, 2, 5, 13]
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-11)}
TINY_VIT = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
)


# ---------------------------------------------------------------- SupCon
def naive_supcon(z, labels, tau, tau_b):
    """Khosla et al. 2020, eq. 2 (L^sup_out): over every view i of every image (the 2N of the "multiviewed
    batch"), -1/|P(i)| sum_{p in P(i)} log(exp(z_i.z_p/tau) / sum_{a != i} exp(z_i.z_a/tau)), P(i) every other
    view with i's label; summed over anchors, here averaged over those with a positive; times tau/tau_b
    (the reference code's scale). A negative label is a class of its own."""
    b, v, _ = z.shape
    views = [(n, m) for n in range(b) for m in range(v)]
    lab = []
    fresh = 0
    for n in range(b):
        if labels[n] < 0:
            fresh += 1
            lab.append(("own", fresh))
        else:
            lab.append(("class", int(labels[n])))
    total, anchors = 0.0, 0
    for i, (n, m) in enumerate(views):
        zi = z[n, m]
        den = sum(torch.exp(zi @ z[n2, m2] / tau) for j, (n2, m2) in enumerate(views) if j != i)
        pos = [(n2, m2) for j, (n2, m2) in enumerate(views) if j != i and lab[n2] == lab[n]]
        if not pos:
            continue
        term = sum(torch.log(torch.exp(zi @ z[n2, m2] / tau) / den) for n2, m2 in pos) / len(pos)
        total = total - term
        anchors += 1
    return (tau / tau_b) * total / anchors


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("v", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_supcon_matches_the_naive_formula(b, v, dtype):
    g = torch.Generator().manual_seed(b * 7 + v)
    z = F.normalize(torch.randn(b, v, 6, generator=g, dtype=dtype), dim=-1).requires_grad_()
    labels = torch.randint(-1, 3, (b,), generator=g)
    if v == 1 and b > 1:
        labels[0] = labels[1] = 2  # one anchor pair at least, when views alone give none
    tau, tau_b = 0.2, 0.07
    naive_has_anchor = v > 1 or len(set(labels[labels >= 0].tolist())) < int((labels >= 0).sum())
    got = supcon_loss(z, labels, tau, tau_b)
    if not naive_has_anchor:
        assert got.item() == 0.0
        return
    ref = naive_supcon(z, labels.tolist(), tau, tau_b)
    (g1,) = torch.autograd.grad(got, z)
    (g2,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(got, ref.to(got.dtype), **TOL[torch.float32])  # the loss computes in fp32
    torch.testing.assert_close(g1, g2, **TOL[torch.float32])


def test_supcon_pulls_same_label_together():
    """Same-label images closer together score a lower loss than the same features with labels shuffled."""
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(2, 8), dim=-1)
    z = F.normalize(
        torch.stack([a] * 3 + [b] * 3)[:, None].repeat(1, 2, 1) + 0.1 * torch.randn(6, 2, 8), dim=-1
    )
    right = torch.tensor([0, 0, 0, 1, 1, 1])
    wrong = torch.tensor([0, 1, 0, 1, 0, 1])
    assert supcon_loss(z, right, 0.1, 0.1) < supcon_loss(z, wrong, 0.1, 0.1)


# ---------------------------------------------------------------- SwAV
def naive_codes(scores, eps, iters):
    """SwAV Algorithm 1 as printed (one process)."""
    q = torch.exp(scores.detach() / eps).T
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iters):
        q = q / q.sum(1, keepdim=True) / k
        q = q / q.sum(0, keepdim=True) / b
    return (q * b).T


def naive_swav(scores, n_assign, tau, eps, iters):
    """Caron et al. 2020, eq. 3 with multi-crop: for each view s with codes q_s (Sinkhorn, no gradient),
    every other view t predicts them: l(z_t, q_s) = -sum_k q_s,k log p_t,k, p_t = softmax(z_t.C / tau);
    averaged over the V - 1 predicting views and the n_assign coded views, each a mean over the batch."""
    b = scores[0].shape[0]
    total = 0.0
    for s in range(n_assign):
        q = naive_codes(scores[s], eps, iters)
        sub = 0.0
        for t in range(len(scores)):
            if t == s:
                continue
            for i in range(b):
                logp = scores[t][i] / tau - torch.logsumexp(scores[t][i] / tau, 0)
                sub = sub - sum(q[i, k] * logp[k] for k in range(q.shape[1])) / b
        total = total + sub / (len(scores) - 1)
    return total / n_assign


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("views,n_assign", [(2, 2), (4, 2), (3, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_swav_matches_the_naive_formula(b, views, n_assign, dtype):
    g = torch.Generator().manual_seed(b * 11 + views)
    protos = F.normalize(torch.randn(5, 6, generator=g, dtype=dtype), dim=-1)
    z = F.normalize(torch.randn(views, b, 6, generator=g, dtype=dtype), dim=-1).requires_grad_()
    scores = list((z @ protos.T).unbind(0))
    got = swav_loss(scores, n_assign, 0.1, 0.05, 3)
    ref = naive_swav(scores, n_assign, 0.1, 0.05, 3)
    (g1,) = torch.autograd.grad(got, z, retain_graph=True)
    (g2,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(got, ref.to(got.dtype), **TOL[torch.float32])
    torch.testing.assert_close(g1, g2.to(g1.dtype), **TOL[torch.float32])


def test_swav_needs_two_views():
    with pytest.raises(ValueError, match="two views"):
        swav_loss([torch.randn(3, 4)], 1, 0.1, 0.05, 3)


# ---------------------------------------------------------------- scene-graph labels
def test_scene_label_is_the_largest_objects_class():
    from mllm.data.geoworld.vocab import COLOR_NAMES, SHAPES
    from mllm.data.views_extra import NO_LABEL, scene_label

    small = {"kind": SHAPES[0], "color": COLOR_NAMES[1], "box": [0, 0, 4, 4]}
    big = {"kind": SHAPES[2], "color": COLOR_NAMES[3], "box": [10, 10, 30, 30]}
    scene = {"shapes": [small, big]}
    assert scene_label(scene, "shape") == 2
    assert scene_label(scene, "colour") == 3
    assert scene_label(scene, "shape_colour") == 2 * len(COLOR_NAMES) + 3
    assert scene_label({"shapes": [], "figure": {}}, "shape") == NO_LABEL


# ---------------------------------------------------------------- the model kind `ssl` with each objective
def _model(objective: str, **args) -> SSLModel:
    torch.manual_seed(0)
    tower = build_tower(TowerConfig(type="dinov2", config=TINY_VIT, select_layer=-1))
    cfg = SSLConfig(
        augment=AugmentConfig(local_crops=2, local_size=16),
        objective=objective,
        objective_args={"head_hidden": 16, "out_dim": 8, **args},
    )
    return SSLModel(tower, cfg)


def _batch(model: SSLModel, n: int = 4) -> dict:
    gen = torch.Generator().manual_seed(1)
    proc = model.image_tower.processor
    aug = Augmenter(model.cfg.augment, 32, proc.image_mean, proc.image_std)
    items = [{"id": str(i), **aug(torch.rand(3, 40, 40, generator=gen), gen)} for i in range(n)]
    batch = {k: v for k, v in collate_views(items).items() if k not in ("skips", "ids")}
    batch["class_labels"] = torch.tensor([0, 1, 0, -1][:n])
    return batch


@pytest.mark.parametrize("objective,args", [("swav", {"n_prototypes": 4}), ("supcon", {})])
def test_ssl_model_trains_and_saves_with_the_objective(objective, args, tmp_path):
    model = _model(objective, **args)
    assert not hasattr(model, "distill") and hasattr(model, "objective")
    batch = _batch(model)
    out = model(**batch)
    assert torch.isfinite(out.loss) and objective in out.stats
    out.loss.backward()
    for prefix in ("image_tower", "objective"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), prefix
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = out.loss.item()
    for _ in range(5):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
    assert model(**batch).loss.item() < first  # a fixed batch: the loss goes down
    model.save_pretrained(tmp_path / "m")
    again = SSLModel.from_pretrained(tmp_path / "m")
    assert again.cfg.objective == objective
    model.eval()
    again.eval()
    torch.testing.assert_close(again(**batch).loss, model(**batch).loss)  # heads and tower reloaded


def test_supcon_without_labels_says_what_is_missing():
    model = _model("supcon")
    batch = _batch(model)
    batch.pop("class_labels")
    with pytest.raises(ValueError, match="class_labels"):
        model(**batch)


# ---------------------------------------------------------------- recipes
@pytest.mark.parametrize(
    "recipe,over,key",
    [
        ("swav-tiny", ["model.encoder.objective_args.n_prototypes=65"], r"n_prototypes=65 .*batch_size"),
        ("swav-tiny", ["model.encoder.objective_args.n_prototypes=0"], r"objective_args\.n_prototypes"),
        ("swav-tiny", ["model.encoder.objective_args.temperature=0"], r"objective_args\.temperature"),
        ("swav-tiny", ["model.encoder.objective_args.epsilon=-1"], r"objective_args\.epsilon"),
        ("swav-tiny", ["model.encoder.objective_args.label=shape"], r"objective_args.*unknown.*label"),
        ("swav-tiny", ["model.encoder.distill.out_dim=64"], r"model\.encoder\.distill"),
        ("swav-tiny", ["model.encoder.export=teacher"], r"model\.encoder\.export"),
        ("supcon-tiny", ["model.encoder.objective_args.temperature=0"], r"objective_args\.temperature"),
        ("supcon-tiny", ["model.encoder.objective_args.base_temperature=-1"], r"base_temperature"),
        ("supcon-tiny", ["model.encoder.objective_args.label=size"], r"objective_args\.label"),
        ("supcon-tiny", ["model.encoder.objective=byol"], r"model\.encoder\.objective: unknown"),
        ("supcon-tiny", ["model.encoder.objective=mlcd"], r"objective_args: unknown key.*label"),
        ("dino-tiny", ["model.encoder.objective_args.n_prototypes=8"], r"objective_args .*takes none"),
    ],
)
def test_bad_options_are_refused_when_the_recipe_loads(recipe, over, key):
    from mllm.config import load_recipe

    with pytest.raises(ConfigError, match=key):
        load_recipe(recipe, over)


@pytest.mark.parametrize("name", ["swav-tiny", "supcon-tiny", "pixpro-tiny", "mlcd-tiny"])
def test_tiny_recipes_differ_from_dino_tiny_only_in_the_objective(name):
    from mllm.config import load_recipe, to_dict

    def rest(n):
        tree = to_dict(load_recipe(n))
        tree.pop("name")
        enc = tree["model"]["encoder"]
        for k in ("objective", "objective_args", "distill"):
            enc.pop(k)
        tree["stages"][0]["data"].pop("json")  # SupCon reads the same images through scenes.jsonl
        return tree

    recipe = load_recipe(name)
    assert recipe.model.encoder.objective == name.split("-")[0]
    assert rest(name) == rest("dino-tiny")
    assert (REPO / "train" / "recipes" / f"{name}.yaml").is_file()


def test_supcon_recipe_builds_its_labelled_dataset(tmp_path):
    from mllm.config import load_recipe
    from mllm.data.geoworld import write_world
    from mllm.families import get_family, get_stage_kind, get_task

    world = tmp_path / "w"
    write_world(
        world,
        seed=5,
        n=8,
        size=64,
        n_eval=8,
        mmvp_pairs=2,
        pope_questions=6,
        refcoco_n=2,
        mathverse_problems=1,
    )
    recipe = load_recipe("supcon-tiny", [f"extra.world={world}"])
    model = get_family("ssl").build(recipe.model, tmp_path, [], 0)
    stage = recipe.stages[0]
    module, ds, collate = get_task(get_stage_kind(stage.kind).task)(model, stage, "plain")
    batch = collate([ds[0], ds[1]])
    assert batch["class_labels"].shape == (2,) and batch["class_labels"].dtype == torch.long
    bad = load_recipe(
        "supcon-tiny", [f"extra.world={world}", "stages.ssl.data.json=" + str(world / "captions.jsonl")]
    )
    with pytest.raises(ValueError, match="scenes.jsonl"):
        get_task("ssl")(model, bad.stages[0], "plain")


# ---------------------------------------------------------------- PixPro
def naive_pixpro(xa, xb, gxa, gxb, ta, tb, box_a, box_b, grid, gamma, thr):
    """Xie et al. 2021, one image, with loops: y_i = sum_j max(cos(x_i, x_j), 0)^gamma g(x_j) within a view;
    (i, j) positive when the original-image distance of patch i's centre (view A) and patch j's (view B) is
    below thr x the larger bin diagonal; L = -mean_pos cos(y^A_i, t^B_j) - mean_pos cos(y^B_j, t^A_i)."""
    gh, gw = grid

    def centre(box, p):
        r, c = divmod(p, gw)
        x0, y0, x1, y1 = [float(v) for v in box]
        return x0 + (c + 0.5) / gw * (x1 - x0), y0 + (r + 0.5) / gh * (y1 - y0)

    def diag(box):
        x0, y0, x1, y1 = [float(v) for v in box]
        return ((abs(x1 - x0) / gw) ** 2 + (abs(y1 - y0) / gh) ** 2) ** 0.5

    def prop(x, gx):
        out = []
        for i in range(len(x)):
            acc = 0.0
            for j in range(len(x)):
                acc = acc + F.cosine_similarity(x[i], x[j], dim=0).clamp_min(0) ** gamma * gx[j]
            out.append(acc)
        return out

    ya, yb = prop(xa, gxa), prop(xb, gxb)
    limit = thr * max(diag(box_a), diag(box_b))
    ab = ba = 0.0
    n = 0
    for i in range(len(xa)):
        for j in range(len(xb)):
            (xa_, ya_), (xb_, yb_) = centre(box_a, i), centre(box_b, j)
            if ((xa_ - xb_) ** 2 + (ya_ - yb_) ** 2) ** 0.5 < limit:
                ab = ab + F.cosine_similarity(ya[i], tb[j], dim=0)
                ba = ba + F.cosine_similarity(yb[j], ta[i], dim=0)
                n += 1
    return None if n == 0 else -(ab + ba) / n


@pytest.mark.parametrize("b", [1, 2, 3])
@pytest.mark.parametrize("flip", [False, True])
def test_pixpro_matches_the_naive_formula(b, flip):
    from encoders.ssl.pixpro import pixpro_loss, positive_pairs, propagate

    grid, gamma, thr = (3, 3), 2.0, 0.7
    g = torch.Generator().manual_seed(b + 10 * flip)
    x = torch.randn(b, 2, 9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(b, 2, 9, 5, generator=g, dtype=torch.float64)
    boxes = []
    for i in range(b):
        a = torch.tensor([0.0, 0.0, 0.6, 0.7], dtype=torch.float64) + 0.1 * i
        c = torch.tensor([0.3, 0.2, 1.0, 0.9], dtype=torch.float64)
        boxes.append((a, c[[2, 1, 0, 3]] if flip else c))
    gx = x @ w
    y = propagate(x.flatten(0, 1), gx.flatten(0, 1), gamma).view_as(x)
    pos = torch.stack([positive_pairs(a, c, grid, thr) for a, c in boxes])
    got = pixpro_loss(y[:, 0], y[:, 1], t[:, 0], t[:, 1], pos)
    refs = [
        naive_pixpro(x[i, 0], x[i, 1], gx[i, 0], gx[i, 1], t[i, 0], t[i, 1], *boxes[i], grid, gamma, thr)
        for i in range(b)
    ]
    refs = [r for r in refs if r is not None]
    assert refs, "the boxes overlap: some pair is positive"
    ref = sum(refs) / len(refs)
    g1 = torch.autograd.grad(got, (x, w), retain_graph=True)
    g2 = torch.autograd.grad(ref, (x, w))
    torch.testing.assert_close(got, ref.to(got.dtype), **TOL[torch.float32])  # the loss computes in fp32
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c.to(a.dtype), **TOL[torch.float32])


def test_pixpro_crop_boxes_map_view_pixels_back_to_the_image():
    """An image whose red channel is its x coordinate and green its y: a view's patch centre, mapped back
    through its box, lands where the view's pixel values say it came from (flipped views included)."""
    from encoders.ssl.pixpro import crop_view, patch_centres

    h = w = 64
    xs = (torch.arange(w) + 0.5) / w
    ys = (torch.arange(h) + 0.5) / h
    image = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.zeros(h, w)])
    gen = torch.Generator().manual_seed(0)
    flips = set()
    for _ in range(12):
        view, box = crop_view(image, 32, (0.2, 1.0), (3 / 4, 4 / 3), 0.5, gen)
        flips.add(bool(box[0] > box[2]))
        centres, _ = patch_centres(box, (4, 4))
        for p in range(16):
            r, c = divmod(p, 4)
            px = view[:, r * 8 + 3 : r * 8 + 5, c * 8 + 3 : c * 8 + 5].mean((1, 2))  # the patch's middle
            torch.testing.assert_close(px[:2], centres[p].float(), atol=0.03, rtol=0)
    assert flips == {True, False}


def test_pixpro_model_trains_and_its_teacher_follows_after_each_step(tmp_path):
    from encoders.ssl.pixpro import pixpro_views

    model = _model("pixpro")
    gen = torch.Generator().manual_seed(2)
    proc = model.image_tower.processor
    mean, std = torch.tensor(proc.image_mean).view(3, 1, 1), torch.tensor(proc.image_std).view(3, 1, 1)
    items = [
        pixpro_views(
            torch.rand(3, 40, 40, generator=gen),
            32,
            (0.4, 1.0),
            (3 / 4, 4 / 3),
            0.5,
            0.8,
            0.3,
            mean,
            std,
            gen,
        )
        for _ in range(3)
    ]
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    model.configure_schedule(1, 10)
    before = {k: v.clone() for k, v in model.objective.teacher.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    first = model(**batch).loss
    assert torch.isfinite(first)
    for _ in range(4):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
        model.after_step()
    assert int(model.objective.steps) == 4
    after = model.objective.teacher.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the teacher moved
    assert model(**batch).loss.item() < first.item()
    model.save_pretrained(tmp_path / "m")
    again = SSLModel.from_pretrained(tmp_path / "m")
    assert int(again.objective.steps) == 4
    torch.testing.assert_close(again(**batch).loss, model(**batch).loss)


@pytest.mark.parametrize(
    "over,key",
    [
        (["model.encoder.objective_args.momentum=1.5"], r"objective_args\.momentum"),
        (["model.encoder.objective_args.gamma=0"], r"objective_args\.gamma"),
        (["model.encoder.objective_args.threshold=-1"], r"objective_args\.threshold"),
        (["model.encoder.objective_args.n_prototypes=4"], r"unknown.*n_prototypes"),
    ],
)
def test_pixpro_bad_options_are_refused_when_the_recipe_loads(over, key):
    from mllm.config import load_recipe

    with pytest.raises(ConfigError, match=key):
        load_recipe("pixpro-tiny", over)


def test_pixpro_recipe_builds_its_boxed_dataset(tmp_path):
    from mllm.config import load_recipe
    from mllm.data.geoworld import write_world
    from mllm.families import get_family, get_stage_kind, get_task

    world = tmp_path / "w"
    write_world(
        world,
        seed=5,
        n=8,
        size=64,
        n_eval=8,
        mmvp_pairs=2,
        pope_questions=6,
        refcoco_n=2,
        mathverse_problems=1,
    )
    recipe = load_recipe("pixpro-tiny", [f"extra.world={world}"])
    model = get_family("ssl").build(recipe.model, tmp_path, [], 0)
    module, ds, collate = get_task(get_stage_kind("ssl").task)(model, recipe.stages[0], "plain")
    batch = collate([ds[0], ds[1]])
    assert batch["view_boxes"].shape == (2, 2, 4) and batch["global_views"].shape[:2] == (2, 2)
    assert torch.isfinite(module(**{k: v for k, v in batch.items() if k not in ("ids", "skips")}).loss)


# ---------------------------------------------------------------- MLCD
def naive_mlcd(cos, positives, s, m):
    """An et al. 2024: per sample, log(1 + sum_{j negative} exp(s cos_j)) + log(1 + sum_{i positive}
    exp(-s (cos_i - m))), averaged over the samples (loops)."""
    total = 0.0
    for r in range(cos.shape[0]):
        pos = set(positives[r].tolist())
        neg_sum = 1.0 + sum(torch.exp(s * cos[r, j]) for j in range(cos.shape[1]) if j not in pos)
        pos_sum = 1.0 + sum(torch.exp(-s * (cos[r, i] - m)) for i in pos)
        as_t = lambda v: torch.as_tensor(v, dtype=torch.float64)  # noqa: E731  (1.0 when a set is empty)
        total = total + torch.log(as_t(neg_sum)) + torch.log(as_t(pos_sum))
    return total / cos.shape[0]


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("k_classes,k_pos", [(1, 1), (5, 1), (7, 3), (4, 4)])
@pytest.mark.parametrize("margin", [0.0, 0.2])
def test_mlcd_loss_matches_the_naive_formula(b, k_classes, k_pos, margin):
    from encoders.objectives_cluster import mlcd_loss

    g = torch.Generator().manual_seed(b * 13 + k_classes)
    cos = torch.rand(b, k_classes, generator=g, dtype=torch.float64).mul(2).sub(1).requires_grad_()
    positives = torch.stack([torch.randperm(k_classes, generator=g)[:k_pos] for _ in range(b)])
    got = mlcd_loss(cos, positives, 8.0, margin)
    ref = naive_mlcd(cos, positives, 8.0, margin)
    (g1,) = torch.autograd.grad(got, cos)
    (g2,) = torch.autograd.grad(ref, cos)
    torch.testing.assert_close(got, ref.to(got.dtype), **TOL[torch.float32])
    torch.testing.assert_close(g1, g2, **TOL[torch.float32])


def test_top_k_clusters_are_the_nearest_centres_first():
    from encoders.objectives_cluster import top_k_clusters

    centres = torch.eye(4)
    x = torch.tensor([[0.9, 0.5, 0.1, 0.0], [0.0, 0.0, 0.2, 1.0]])
    assert top_k_clusters(x, centres, 2).tolist() == [[0, 1], [3, 2]]


def test_mlcd_model_trains_and_saves(tmp_path):
    model = _model("mlcd", n_clusters=6, n_positive=2)
    batch = _batch(model)
    batch["cluster_labels"] = torch.tensor([[0, 1], [2, 3], [0, 1], [4, 5]])
    opt = torch.optim.SGD(model.parameters(), lr=0.005)  # scale 16: a larger step overshoots
    first = model(**batch).loss.item()
    for _ in range(5):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    assert model(**batch).loss.item() < first
    model.save_pretrained(tmp_path / "m")
    again = SSLModel.from_pretrained(tmp_path / "m")
    model.eval()
    again.eval()
    torch.testing.assert_close(again(**batch).loss, model(**batch).loss)


@pytest.mark.parametrize(
    "over,key",
    [
        (["model.encoder.objective_args.n_positive=40"], r"n_positive=40 is larger than .*n_clusters=32"),
        (["model.encoder.objective_args.n_clusters=0"], r"objective_args\.n_clusters"),
        (["model.encoder.objective_args.scale=0"], r"objective_args\.scale"),
        (["model.encoder.objective_args.margin=1.0"], r"objective_args\.margin"),
        (["model.encoder.objective_args.label=shape"], r"unknown.*label"),
    ],
)
def test_mlcd_bad_options_are_refused_when_the_recipe_loads(over, key):
    from mllm.config import load_recipe

    with pytest.raises(ConfigError, match=key):
        load_recipe("mlcd-tiny", over)


def test_mlcd_recipe_clusters_the_training_images_at_stage_start(tmp_path):
    from mllm.config import load_recipe
    from mllm.data.geoworld import write_world
    from mllm.families import get_family, get_task

    world = tmp_path / "w"
    write_world(
        world,
        seed=5,
        n=8,
        size=64,
        n_eval=8,
        mmvp_pairs=2,
        pope_questions=6,
        refcoco_n=2,
        mathverse_problems=1,
    )
    over = [
        f"extra.world={world}",
        "model.encoder.objective_args.n_clusters=4",
        "model.encoder.objective_args.n_positive=2",
    ]
    recipe = load_recipe("mlcd-tiny", over)
    model = get_family("ssl").build(recipe.model, tmp_path, [], 0)
    module, ds, collate = get_task("ssl")(model, recipe.stages[0], "plain")
    labels = ds.labels
    assert labels.shape == (len(ds), 2) and set(labels.flatten().tolist()) <= set(range(4))
    assert (labels[:, 0] != labels[:, 1]).all()  # two distinct positives per image
    batch = collate([ds[0], ds[1]])
    assert torch.equal(batch["cluster_labels"], labels[:2])
    _, ds2, _ = get_task("ssl")(model, recipe.stages[0], "plain")
    assert torch.equal(ds2.labels, labels)  # deterministic: a resume recomputes the same clusters
    too_many = load_recipe(
        "mlcd-tiny", [f"extra.world={world}", "model.encoder.objective_args.n_clusters=50"]
    )
    big = get_family("ssl").build(too_many.model, tmp_path, [], 0)
    with pytest.raises(ConfigError, match=r"objective_args\.n_clusters=50 is more than the"):
        get_task("ssl")(big, too_many.stages[0], "plain")


def test_projection_head_batch_norm_centres_the_batch_and_takes_a_batch_of_one():
    """The head's BatchNorm (SwAV's) removes what every row shares: rows that differ only by a small
    part come out far apart; a batch of one in training mode uses the running statistics."""
    from encoders.ssl.supcon import ProjectionHead

    torch.manual_seed(0)
    head = ProjectionHead(6, 16, 4, batch_norm=True)
    shared = torch.randn(1, 6) * 10
    x = shared + 0.01 * torch.randn(8, 6)
    z = head(x)
    assert (z @ z.T)[~torch.eye(8, dtype=torch.bool)].mean() < 0.5
    plain = ProjectionHead(6, 16, 4, batch_norm=False)
    zp = plain(x)
    assert (zp @ zp.T)[~torch.eye(8, dtype=torch.bool)].mean() > 0.99
    one = head(x[:1])
    assert one.shape == (1, 4) and torch.isfinite(one).all()
    head.eval()
    torch.testing.assert_close(head(x[:1]), one)  # the same running statistics as a batch of one in training
