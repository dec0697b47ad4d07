"""encoders.objectives_extra (ConVIRT, MoCHi, CACR, MV-InfoNCE) against naive implementations of each paper's formula written
here (loops over queries), values and gradients in fp32 and fp64, batch sizes 1, 2, 5 and 13 with chunked
and plain paths; the distributed local-loss forms in two `gloo` processes; bad options refused when the
recipe loads, naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import _dist_objectives_extra_worker as dist_worker
import pytest
import torch
import torch.nn.functional as F
from helpers import subprocess_env
from safetensors.torch import load_file

from encoders.objectives import OBJECTIVES, get_objective

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(1, 4), (2, 3), (5, 8), (13, 16)]  # (B, D); 5 and 13 are not multiples of the chunk 4
CHUNKS = [4, 1000]  # 4: chunked kernels (ragged last chunk); 1000: the plain full-matrix path
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-11)}


# ---------------------------------------------------------------- naive references (not calling encoders)
def naive_convirt(v, u, tau, lam):
    """ConVIRT eq. (2)-(3): l_i(v->u) = -log exp(<v_i,u_i>/tau) / sum_k exp(<v_i,u_k>/tau), likewise u->v;
    L = mean_i lam * l_i(v->u) + (1 - lam) * l_i(u->v), <,> the cosine similarity: the dot product of the
    unit vectors the objectives take (F.cosine_similarity would add the normalisation's Jacobian)."""
    b = len(v)
    total = 0.0
    for i in range(b):
        cos_vu = torch.stack([v[i] @ u[k] for k in range(b)]) / tau
        cos_uv = torch.stack([u[i] @ v[k] for k in range(b)]) / tau
        l_vu = -torch.log(torch.exp(cos_vu[i]) / torch.exp(cos_vu).sum())
        l_uv = -torch.log(torch.exp(cos_uv[i]) / torch.exp(cos_uv).sum())
        total = total + lam * l_vu + (1 - lam) * l_uv
    return total / b


def naive_mochi_direction(q, k, s, n_hard, draws):
    """MoCHi for one direction: queries q, keys k (k_i is q_i's positive, every other key a negative).
    For query i: the N hardest negatives (highest q.n first); h = normalise(a n_a + (1-a) n_b) and
    h' = normalise(b q + (1-b) n_c) (constants); loss_i = -log e^{s q.k_i} / (e^{s q.k_i} + sum_neg e^{s q.n}
    + sum_h e^{s q.h} + sum_h' e^{s q.h'})."""
    b = len(q)
    total = 0.0
    for i in range(b):
        negs = [j for j in range(b) if j != i]
        terms = [torch.exp(s * q[i] @ k[j]) for j in range(b)]  # positive and real negatives
        n = min(n_hard, len(negs))
        if draws is not None and n >= 1:
            qd, kd = q[i].detach(), k.detach()
            order = sorted(negs, key=lambda j: -(qd @ kd[j]).item())[:n]
            for a, bb, al in zip(draws["a"][i], draws["b"][i], draws["alpha"][i]):
                h = al * kd[order[a]] + (1 - al) * kd[order[bb]]
                terms.append(torch.exp(s * q[i] @ (h / h.norm())))
            for c, be in zip(draws["c"][i], draws["beta"][i]):
                h = be * qd + (1 - be) * kd[order[c]]
                terms.append(torch.exp(s * q[i] @ (h / h.norm())))
        total = total - torch.log(torch.exp(s * q[i] @ k[i]) / torch.stack(terms).sum())
    return total / b


def naive_mochi(img, txt, s, n_hard, draws_i2t, draws_t2i):
    return (
        naive_mochi_direction(img, txt, s, n_hard, draws_i2t)
        + naive_mochi_direction(txt, img, s, n_hard, draws_t2i)
    ) / 2


def naive_clip(img, txt, s):
    labels = torch.arange(len(img))
    return (F.cross_entropy(s * img @ txt.T, labels) + F.cross_entropy(s * txt @ img.T, labels)) / 2


# ---------------------------------------------------------------- data and comparison
def make(b, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + b * 31 + d)
    unit = lambda: F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    return {
        "img": unit().to(dtype).requires_grad_(),
        "txt": unit().to(dtype).requires_grad_(),
        "scale": torch.tensor(3.5, dtype=dtype, requires_grad=True),
    }


def compare(ours, ref, x, wrt=("img", "txt", "scale")):
    tol = TOL[x["img"].dtype]
    torch.testing.assert_close(ours, ref.to(ours.dtype), **tol)
    inputs = [x[k] for k in wrt]
    g_ours = torch.autograd.grad(ours, inputs, allow_unused=True)
    g_ref = torch.autograd.grad(ref, inputs, allow_unused=True)
    for k, a, b in zip(wrt, g_ours, g_ref):
        a = torch.zeros_like(x[k]) if a is None else a
        b = torch.zeros_like(x[k]) if b is None else b
        torch.testing.assert_close(a, b, **tol, msg=lambda m, k=k: f"grad wrt {k}: {m}")


def recording(obj):
    """Record the objective's random draws (MoCHi), so the naive formula can use the same ones."""
    seen: list[dict[str, torch.Tensor]] = []
    draw = obj._draw

    def rec(*a, **kw):
        d = draw(*a, **kw)
        seen.append(d)
        return d

    obj._draw = rec
    return seen


def as_lists(d):
    return None if d is None else {k: v.tolist() for k, v in d.items()}


# ---------------------------------------------------------------- ConVIRT
@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lam,tau", [(0.75, 0.1), (0.0, 0.3), (1.0, 0.5), (0.3, None)])
def test_convirt(b, d, chunk, dtype, lam, tau):
    x = make(b, d, dtype)
    obj = get_objective("convirt", chunk=chunk, weight_i2t=lam, temperature=tau)
    loss, stats = obj(x["img"], x["txt"], x["scale"], None)
    t = 1 / x["scale"] if tau is None else tau
    compare(loss, naive_convirt(x["img"], x["txt"], t, lam), x)
    want_scale = x["scale"].item() if tau is None else 1 / tau
    assert stats["scale"].item() == pytest.approx(want_scale, rel=1e-6)


def test_convirt_defaults_are_the_papers():
    obj = get_objective("convirt")
    assert (obj.weight_i2t, obj.temperature) == (0.75, 0.1)
    assert OBJECTIVES["convirt"].logit_init.log_scale == pytest.approx(torch.tensor(10.0).log().item())
    x = make(6, 8, torch.float64)  # λ = 1/2 with the scale 1/τ is CLIP's loss
    half = get_objective("convirt", weight_i2t=0.5, temperature=1 / 3.5)(x["img"], x["txt"], x["scale"])[0]
    torch.testing.assert_close(half, naive_clip(x["img"], x["txt"], 3.5))


# ---------------------------------------------------------------- MoCHi
@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_hard,n_mix,n_query_mix", [(3, 4, 2), (16, 5, 0), (2, 0, 3), (1, 1, 1)])
def test_mochi(b, d, chunk, dtype, n_hard, n_mix, n_query_mix):
    x = make(b, d, dtype)
    obj = get_objective("mochi", chunk=chunk, n_hard=n_hard, n_mix=n_mix, n_query_mix=n_query_mix)
    seen = recording(obj)
    torch.manual_seed(0)
    loss = obj(x["img"], x["txt"], x["scale"], None)[0]
    if b == 1:
        assert seen == []  # no negative to mix: CLIP's loss (0 for one pair)
        seen = [None, None]
    assert len(seen) == 2
    ref = naive_mochi(x["img"], x["txt"], x["scale"], n_hard, *map(as_lists, seen))
    compare(loss, ref, x)


def test_mochi_draws_follow_the_paper():
    obj = get_objective("mochi", n_hard=4, n_mix=2000, n_query_mix=2000)
    d = obj._draw(3, 4, torch.device("cpu"), torch.float64)
    assert d["a"].shape == d["b"].shape == d["alpha"].shape == (3, 2000)
    assert d["c"].shape == d["beta"].shape == (3, 2000)
    assert 0 <= d["a"].min() and d["a"].max() == 3 and d["c"].max() == 3  # all N hardest, no others
    assert 0 < d["alpha"].min() and d["alpha"].max() < 1 and d["alpha"].mean() == pytest.approx(0.5, abs=0.02)
    assert 0 <= d["beta"].min() and d["beta"].max() < 0.5  # β in (0, 0.5): the query weighs less


def test_mochi_without_mixing_is_clip_and_mixing_only_adds_negatives():
    x = make(9, 8, torch.float64)
    plain = get_objective("mochi", n_mix=0, n_query_mix=0, chunk=4)(x["img"], x["txt"], x["scale"])
    torch.testing.assert_close(plain[0], naive_clip(x["img"], x["txt"], x["scale"]))
    mixed = get_objective("mochi", n_hard=3, n_mix=8, n_query_mix=8, chunk=4)(x["img"], x["txt"], x["scale"])
    assert mixed[0] > plain[0]
    assert set(mixed[1]) == {"loss_i2t", "loss_t2i", "scale", "acc_i2t", "acc_t2i"}
    # the accuracies are over the real columns only: equal with and without synthetic negatives
    assert mixed[1]["acc_i2t"] == plain[1]["acc_i2t"] and mixed[1]["acc_t2i"] == plain[1]["acc_t2i"]


# ---------------------------------------------------------------- distributed: 2 gloo ranks vs one process
def test_distributed_equals_single_process(tmp_path):
    """Each rank holds half the batch; the mean of the ranks' losses = the naive loss on the whole batch;
    each rank's gradient wrt its local features / world = the whole-batch gradient's slice; the scale's
    gradient averaged over ranks = the whole-batch one. MoCHi's draws: every rank and the reference seed
    torch alike, and the draws are made for the global batch."""
    from mllm.training.distributed import free_port

    w = dist_worker
    world = 2
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "_dist_objectives_extra_worker.py"), str(tmp_path)],
            env=subprocess_env(REPO, RANK=str(r), LOCAL_RANK=str(r), OMP_NUM_THREADS="1", **env),
            cwd=REPO,
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
    for case, (name, cfg) in w.CASES.items():
        x = {k: v.clone().requires_grad_() for k, v in full.items()}
        if name == "convirt":
            tau = cfg["temperature"] if cfg["temperature"] is not None else 1 / x["scale"]
            ref = naive_convirt(x["img"], x["txt"], tau, cfg["weight_i2t"])
        elif name == "mv_infonce":
            ref = naive_mv_infonce([x["img"], x["txt"]], x["scale"])
        elif name == "cacr":
            ref = naive_cacr(x["img"], x["txt"], cfg["t_pos"], cfg["t_neg"], cfg.get("weights_grad", False))
        else:
            single = get_objective(name, **cfg)
            seen = recording(single)
            torch.manual_seed(w.SEED)
            single(full["img"], full["txt"], full["scale"])
            ref = naive_mochi(x["img"], x["txt"], x["scale"], cfg["n_hard"], *map(as_lists, seen))
        keys = ["img", "txt", "scale"]
        grads = dict(zip(keys, torch.autograd.grad(ref, [x[k] for k in keys], allow_unused=True)))
        if grads["scale"] is None:
            grads["scale"] = torch.zeros((), dtype=torch.float64)
        mean_loss = sum(rk[f"{case}.loss"] for rk in ranks) / world
        torch.testing.assert_close(mean_loss[0], ref.detach(), rtol=1e-10, atol=1e-10, msg=f"{case} loss")
        for r, rk in enumerate(ranks):
            for k in ("img", "txt"):
                torch.testing.assert_close(
                    rk[f"{case}.grad.{k}"] / world,
                    grads[k][r * b : (r + 1) * b],
                    rtol=1e-9,
                    atol=1e-12,
                    msg=lambda m, where=f"{case} rank {r} grad {k}": f"{where}: {m}",
                )
        mean_g = sum(rk[f"{case}.grad.scale"] for rk in ranks) / world
        torch.testing.assert_close(mean_g[0], grads["scale"], rtol=1e-9, atol=1e-12, msg=f"{case} grad scale")
    # the MV-InfoNCE kernel with three views
    x = {k: v.clone().requires_grad_() for k, v in full.items()}
    keys = ["img", "txt", "v3", "scale"]
    ref = naive_mv_infonce([x["img"], x["txt"], x["v3"]], x["scale"])
    grads = dict(zip(keys, torch.autograd.grad(ref, [x[k] for k in keys])))
    torch.testing.assert_close(
        sum(rk["mv3.loss"] for rk in ranks)[0] / world, ref.detach(), rtol=1e-10, atol=1e-10
    )
    for r, rk in enumerate(ranks):
        for k in ("img", "txt", "v3"):
            torch.testing.assert_close(
                rk[f"mv3.grad.{k}"] / world, grads[k][r * b : (r + 1) * b], rtol=1e-9, atol=1e-12
            )
    mean_g = sum(rk["mv3.grad.scale"] for rk in ranks)[0] / world
    torch.testing.assert_close(mean_g, grads["scale"], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- bad configuration
@pytest.mark.parametrize(
    "objective,args,key",
    [
        ("convirt", {"weight_i2t": 1.5}, "weight_i2t"),
        ("convirt", {"weight_i2t": -0.1}, "weight_i2t"),
        ("convirt", {"temperature": 0}, "temperature"),
        ("mochi", {"n_mix": -1}, "n_mix"),
        ("mochi", {"n_query_mix": -2}, "n_query_mix"),
        ("mochi", {"n_hard": 0}, "n_hard"),
        ("mochi", {"n_hard": 2.5}, "n_hard"),
        ("cacr", {"t_neg": -1.0}, "t_neg"),
        ("cacr", {"t_pos": ".inf"}, "t_pos"),
        ("clip", {"weight_i2t": 0.5}, "weight_i2t"),  # an option of another objective
    ],
)
def test_bad_options_are_refused_when_the_recipe_loads(objective, args, key):
    from encoders.common import ConfigError
    from mllm.config import load_recipe

    over = [f"model.encoder.objective={objective}"] + [
        f"model.encoder.objective_args.{k}={v}" for k, v in args.items()
    ]
    with pytest.raises(ConfigError, match=rf"model\.encoder\.objective_args: .*{key}"):
        load_recipe("clip-tiny", over)


@pytest.mark.parametrize("name", ["convirt-tiny", "mochi-tiny", "cacr-tiny", "mv_infonce-tiny"])
def test_tiny_recipes_load_and_differ_from_clip_tiny_only_in_the_objective(name):
    from mllm.config import load_recipe, to_dict

    def rest(n):
        tree = to_dict(load_recipe(n))
        tree.pop("name")
        enc = tree["model"]["encoder"]
        return enc.pop("objective"), enc.pop("objective_args"), tree

    objective, args, tree = rest(name)
    assert objective == name.split("-")[0] and objective in OBJECTIVES
    get_objective(objective, **args)
    assert tree == rest("clip-tiny")[2]
    assert (REPO / "train" / "recipes" / f"{name}.yaml").is_file()


# ---------------------------------------------------------------- CACR
def naive_cacr_direction(q, k, t_pos, t_neg, weights_grad):
    """CACR for one direction: for query i, positives {k_i}, negatives {k_j, j != i};
    L_i = sum_+ π+ c(q_i, k+) - sum_- π- c(q_i, k-), c = squared Euclidean distance,
    π+ ∝ exp(t_pos c), π- ∝ exp(-t_neg c) (normalised over the query's positives, negatives)."""
    b = len(q)
    total = 0.0
    for i in range(b):
        c = [((q[i] - k[j]) ** 2).sum() for j in range(b)]
        cw = [x if weights_grad else x.detach() for x in c]
        pos = [i]
        negs = [j for j in range(b) if j != i]
        zp = sum(torch.exp(t_pos * cw[j]) for j in pos)
        attract = sum(torch.exp(t_pos * cw[j]) / zp * c[j] for j in pos)
        repel = 0.0
        if negs:
            zn = sum(torch.exp(-t_neg * cw[j]) for j in negs)
            repel = sum(torch.exp(-t_neg * cw[j]) / zn * c[j] for j in negs)
        total = total + attract - repel
    return total / b


def naive_cacr(img, txt, t_pos, t_neg, weights_grad=False):
    return (
        naive_cacr_direction(img, txt, t_pos, t_neg, weights_grad)
        + naive_cacr_direction(txt, img, t_pos, t_neg, weights_grad)
    ) / 2


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t_pos,t_neg,weights_grad", [(1.0, 1.0, False), (0.5, 3.0, True), (0.0, 0.0, False)])
def test_cacr(b, d, chunk, dtype, t_pos, t_neg, weights_grad):
    x = make(b, d, dtype)
    obj = get_objective("cacr", chunk=chunk, t_pos=t_pos, t_neg=t_neg, weights_grad=weights_grad)
    loss, stats = obj(x["img"], x["txt"], x["scale"], None)
    compare(loss, naive_cacr(x["img"], x["txt"], t_pos, t_neg, weights_grad), x)
    torch.testing.assert_close(loss.detach(), stats["attract"] - stats["repel"], **TOL[dtype])


def test_cacr_repels_close_negatives_more():
    """A larger t_neg puts more weight on the closest negatives: the repulsion term (a weighted mean of
    negative distances) shrinks towards the smallest distance as t_neg grows."""
    x = make(12, 8, torch.float64)
    rep = [get_objective("cacr", t_neg=t)(x["img"], x["txt"], 1.0)[1]["repel"] for t in (0.0, 1.0, 10.0, 1e4)]
    assert rep[0] > rep[1] > rep[2] > rep[3]
    cost = torch.cdist(x["img"].detach(), x["txt"].detach()) ** 2
    off = cost.masked_fill(torch.eye(12, dtype=torch.bool), float("inf"))
    closest = (off.min(1).values.mean() + off.min(0).values.mean()) / 2
    torch.testing.assert_close(rep[3], closest, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- MV-InfoNCE
def naive_mv_infonce(views, s):
    """MV-InfoNCE: for sample i with views z_i^1..z_i^M, L_i = -log(sum_{l != m} e^{s z_i^l.z_i^m} /
    sum_l sum_{(j, m) != (i, l)} e^{s z_i^l.z_j^m}); L = mean_i L_i."""
    n, m_views = len(views[0]), len(views)
    total = 0.0
    for i in range(n):
        num = sum(
            torch.exp(s * views[a][i] @ views[c][i]) for a in range(m_views) for c in range(m_views) if a != c
        )
        den = sum(
            torch.exp(s * views[a][i] @ views[c][j])
            for a in range(m_views)
            for c in range(m_views)
            for j in range(n)
            if (j, c) != (i, a)
        )
        total = total - torch.log(num / den)
    return total / n


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mv_infonce_objective(b, d, chunk, dtype):
    x = make(b, d, dtype)
    loss = get_objective("mv_infonce", chunk=chunk)(x["img"], x["txt"], x["scale"], None)[0]
    compare(loss, naive_mv_infonce([x["img"], x["txt"]], x["scale"]), x)


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("n_views", [2, 3, 4])
@pytest.mark.parametrize("chunk", [3, 1000])
def test_mv_infonce_kernel_more_views(b, d, n_views, chunk):
    from encoders.objectives_extra import mv_infonce

    g = torch.Generator().manual_seed(b * 7 + n_views)
    views = [
        F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
        for _ in range(n_views)
    ]
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    ours = mv_infonce(views, s, chunk)[0]
    ref = naive_mv_infonce(views, s)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-11)
    for a, r in zip(torch.autograd.grad(ours, [*views, s]), torch.autograd.grad(ref, [*views, s])):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)
