"""encoders.objectives_cluster: Sinkhorn-Knopp against SwAV's published pseudo-code and its marginals;
spherical k-means's fixed point; ProtoCLIP against a naive transcription of its formula (loops over samples
and clusters; values and gradients in fp32 and fp64; batch sizes 1, 2, 5, 13 with chunked and plain
paths); its bad options and a batch too small for its prototypes refused when the recipe loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import encoders  # noqa: F401  (registers the objectives of objectives_extra / objectives_cluster)
from encoders.common import ConfigError
from encoders.objectives import get_objective
from encoders.objectives_cluster import sinkhorn_knopp, spherical_kmeans

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(1, 4), (2, 3), (5, 8), (13, 16)]  # (B, D); 5 and 13 are not multiples of the chunk 4
CHUNKS = [4, 1000]
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-11)}


# ---------------------------------------------------------------- Sinkhorn-Knopp
def naive_sinkhorn(scores, eps, iters):
    """SwAV's Algorithm 1 (Caron et al. 2020, appendix), one process, as printed."""
    q = torch.exp(scores / eps).T
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iters):
        q = q / q.sum(1, keepdim=True)
        q = q / k
        q = q / q.sum(0, keepdim=True)
        q = q / b
    return (q * b).T


@pytest.mark.parametrize("b,k", [(1, 3), (7, 5), (16, 4), (5, 9)])
def test_sinkhorn_matches_swav_pseudo_code(b, k):
    torch.manual_seed(b * 10 + k)
    scores = (
        F.normalize(torch.randn(b, 6, dtype=torch.float64), dim=-1)
        @ F.normalize(torch.randn(k, 6, dtype=torch.float64), dim=-1).T
    )
    got = sinkhorn_knopp(scores, 0.05, 3)
    torch.testing.assert_close(got, naive_sinkhorn(scores, 0.05, 3), rtol=1e-10, atol=1e-12)


def test_sinkhorn_marginals_are_the_equipartition():
    torch.manual_seed(0)
    b, k = 24, 6
    scores = torch.randn(b, k, dtype=torch.float64).tanh()
    q = sinkhorn_knopp(scores, 0.5, 200)
    torch.testing.assert_close(q.sum(1), torch.ones(b, dtype=torch.float64))  # each sample: a distribution
    torch.testing.assert_close(q.sum(0), torch.full((k,), b / k, dtype=torch.float64))  # each prototype B/K
    assert (q >= 0).all()
    few = sinkhorn_knopp(scores, 0.5, 3)
    torch.testing.assert_close(few.sum(1), torch.ones(b, dtype=torch.float64))  # rows exact after any iters


def test_sinkhorn_codes_carry_no_gradient_and_keep_the_dtype():
    s = torch.randn(4, 3, requires_grad=True)
    q = sinkhorn_knopp(s)
    assert not q.requires_grad and q.dtype == torch.float32


# ---------------------------------------------------------------- k-means
@pytest.mark.parametrize("n,k", [(1, 1), (9, 3), (13, 4), (5, 8)])
def test_spherical_kmeans_is_a_fixed_point(n, k):
    torch.manual_seed(n)
    x = torch.randn(n, 5, dtype=torch.float64)
    centres, assign = spherical_kmeans(x, k, iters=50)
    kk = min(n, k)
    assert centres.shape == (kk, 5) and assign.shape == (n,)
    z = F.normalize(x, dim=-1)
    # every point sits with its most similar centre
    torch.testing.assert_close((z @ centres.T).max(1).values, (z * centres[assign]).sum(-1))
    for c in range(kk):  # every centre with members is their normalised mean
        members = z[assign == c]
        if len(members):
            torch.testing.assert_close(centres[c], F.normalize(members.sum(0), dim=0))
    again = spherical_kmeans(x, k, iters=50)
    assert torch.equal(again[1], assign)  # deterministic: the seed is its own, not the global RNG


def test_spherical_kmeans_separates_clear_clusters_and_leaves_the_global_rng():
    torch.manual_seed(0)
    base = torch.eye(3, 6)
    x = torch.cat([base[i] + 0.01 * torch.randn(4, 6) for i in range(3)])
    state = torch.get_rng_state()
    _, assign = spherical_kmeans(x, 3)
    assert torch.equal(torch.get_rng_state(), state)
    groups = [set(assign[4 * i : 4 * i + 4].tolist()) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set().union(*groups)) == 3


# ---------------------------------------------------------------- ProtoCLIP
def naive_protoclip(img, txt, s, y_img, y_txt, k, tau, w):
    """ProtoCLIP with prototypical back-translation, transcribed with loops:
    c^{I->T}_c = normalise(sum of txt_i over images i in image cluster c) (no gradient), likewise
    c^{T->I}_c from the images over text clusters; L = CLIP + w * (mean_i -log softmax_c(txt_i.c^{I->T}_c /
    tau)[y_img_i] + mean_i -log softmax_c(img_i.c^{T->I}_c / tau)[y_txt_i]) / 2."""
    b = len(img)
    labels = torch.arange(b)
    clip = (F.cross_entropy(s * img @ txt.T, labels) + F.cross_entropy(s * txt @ img.T, labels)) / 2

    def protos(assign, feats):
        out = []
        for c in range(k):
            acc = torch.zeros(feats.shape[1], dtype=feats.dtype)
            for i in range(b):
                if assign[i] == c:
                    acc = acc + feats[i].detach()
            out.append(acc / acc.norm() if acc.norm() > 0 else acc)
        return out

    c_i2t, c_t2i = protos(y_img, txt), protos(y_txt, img)
    l_txt = l_img = 0.0
    for i in range(b):
        lt = torch.stack([txt[i] @ c_i2t[c] / tau for c in range(k)])
        li = torch.stack([img[i] @ c_t2i[c] / tau for c in range(k)])
        l_txt = l_txt - (lt[y_img[i]] - torch.logsumexp(lt, 0))
        l_img = l_img - (li[y_txt[i]] - torch.logsumexp(li, 0))
    return clip + w * (l_txt / b + l_img / b) / 2


def _pairs(b, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    return img, txt


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_protoclip_matches_the_naive_formula(b, d, chunk, dtype):
    k, tau, w = 3, 0.07, 0.7
    obj = get_objective("protoclip", chunk=chunk, n_prototypes=k, proto_temperature=tau, w_proto=w)
    img, txt = _pairs(b, d, dtype, seed=b)
    scale = torch.tensor(3.0, dtype=dtype)
    loss, stats = obj(img, txt, scale, None)
    gi, gt = torch.autograd.grad(loss, (img, txt))
    kk = min(k, b)
    _, y_img = spherical_kmeans(img, kk, obj.kmeans_iters)
    _, y_txt = spherical_kmeans(txt, kk, obj.kmeans_iters)
    ref = naive_protoclip(img, txt, scale, y_img.tolist(), y_txt.tolist(), kk, tau, w)
    ri, rt = torch.autograd.grad(ref, (img, txt))
    torch.testing.assert_close(loss, ref, **TOL[dtype])
    torch.testing.assert_close(gi, ri, **TOL[dtype])
    torch.testing.assert_close(gt, rt, **TOL[dtype])
    assert {"loss_clip", "loss_proto", "proto_acc_txt", "proto_acc_img", "acc_i2t"} <= set(stats)


def test_protoclip_weight_zero_is_clip():
    img, txt = _pairs(6, 5, torch.float64)
    s = torch.tensor(2.0, dtype=torch.float64)
    a, _ = get_objective("protoclip", w_proto=0.0, n_prototypes=2)(img, txt, s, None)
    c, _ = get_objective("clip")(img, txt, s, None)
    torch.testing.assert_close(a, c)


def test_protoclip_prototype_term_rewards_the_other_modalitys_grouping():
    """Texts that follow their images' two groups score a lower prototype loss than texts that do not."""
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(2, 8), dim=-1)
    img = F.normalize(torch.stack([a] * 4 + [b] * 4) + 0.05 * torch.randn(8, 8), dim=-1)
    good = img.clone()
    bad = img[torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])]
    obj = get_objective("protoclip", n_prototypes=2, w_proto=1.0)
    _, s_good = obj(img, good, torch.tensor(1.0), None)
    _, s_bad = obj(img, bad, torch.tensor(1.0), None)
    assert s_good["loss_proto"] < s_bad["loss_proto"]


# ---------------------------------------------------------------- recipe
@pytest.mark.parametrize(
    "args,key",
    [
        ({"n_prototypes": 0}, "n_prototypes"),
        ({"n_prototypes": 2.5}, "n_prototypes"),
        ({"proto_temperature": 0}, "proto_temperature"),
        ({"proto_temperature": -0.1}, "proto_temperature"),
        ({"w_proto": -1}, "w_proto"),
        ({"kmeans_iters": -1}, "kmeans_iters"),
        ({"n_hard": 3}, "n_hard"),  # an option of another objective (MoCHi)
    ],
)
def test_protoclip_bad_options_are_refused_when_the_recipe_loads(args, key):
    from mllm.config import load_recipe

    over = [f"model.encoder.objective_args.{k}={v}" for k, v in args.items()]
    with pytest.raises(ConfigError, match=rf"model\.encoder\.objective_args: .*{key}"):
        load_recipe("protoclip-tiny", over)


def test_more_prototypes_than_the_batch_is_refused_naming_both_keys():
    from mllm.config import load_recipe

    with pytest.raises(
        ConfigError, match=r"objective_args\.n_prototypes=65 .*stages\.contrastive\.batch_size"
    ):
        load_recipe("protoclip-tiny", ["model.encoder.objective_args.n_prototypes=65"])
    load_recipe("protoclip-tiny", ["model.encoder.objective_args.n_prototypes=64"])  # = batch: fine


def test_protoclip_tiny_differs_from_clip_tiny_only_in_the_objective():
    from mllm.config import load_recipe, to_dict

    def rest(n):
        tree = to_dict(load_recipe(n))
        tree.pop("name")
        enc = tree["model"]["encoder"]
        return enc.pop("objective"), enc.pop("objective_args"), tree

    objective, args, tree = rest("protoclip-tiny")
    assert objective == "protoclip" and args["n_prototypes"] <= 64
    assert tree == rest("clip-tiny")[2]
    assert (REPO / "train" / "recipes" / "protoclip-tiny.yaml").is_file()


# ---------------------------------------------------------------- distributed: 2 gloo ranks vs one process
def naive_swav_two_views(v0, v1, tau, eps, iters):
    """SwAV with two views, both coded: (l(v1, q0) + l(v0, q1)) / 2, l(z, q) = -mean_i sum_k q_ik log
    softmax(z_i / tau)_k, q = the codes of the whole batch."""
    q0, q1 = naive_sinkhorn(v0.detach(), eps, iters), naive_sinkhorn(v1.detach(), eps, iters)

    def ce(z, q):
        return -sum(
            (q[i] * (z[i] / tau - torch.logsumexp(z[i] / tau, 0))).sum() for i in range(len(z))
        ) / len(z)

    return (ce(v1, q0) + ce(v0, q1)) / 2


def test_distributed_equals_single_process(tmp_path):
    """Each rank holds half the batch: the mean of the ranks' losses = the formula on the whole batch, each
    rank's gradient of its rows / world = the whole-batch gradient's slice, the scale's gradient averaged
    over ranks = the whole-batch one, and each rank's Sinkhorn codes = the whole batch's codes' slice."""
    import subprocess
    import sys

    import _dist_cluster_worker as w
    from helpers import subprocess_env
    from safetensors.torch import load_file

    from mllm.training.distributed import free_port

    world = 2
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "_dist_cluster_worker.py"), str(tmp_path)],
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
    tol = dict(rtol=1e-10, atol=1e-10)

    x = {k: full[k].clone().requires_grad_() for k in ("img", "txt", "scale")}
    cfg = w.PROTOCLIP
    _, y_img = spherical_kmeans(full["img"], w.K, 10)
    _, y_txt = spherical_kmeans(full["txt"], w.K, 10)
    ref = naive_protoclip(
        x["img"],
        x["txt"],
        x["scale"],
        y_img.tolist(),
        y_txt.tolist(),
        w.K,
        cfg["proto_temperature"],
        cfg["w_proto"],
    )
    grads = dict(zip(x, torch.autograd.grad(ref, list(x.values()))))
    torch.testing.assert_close(sum(rk["protoclip.loss"] for rk in ranks)[0] / world, ref.detach(), **tol)
    torch.testing.assert_close(
        sum(rk["protoclip.grad.scale"] for rk in ranks)[0] / world, grads["scale"], **tol
    )
    for r, rk in enumerate(ranks):
        for k in ("img", "txt"):
            torch.testing.assert_close(
                rk[f"protoclip.grad.{k}"] / world, grads[k][r * b : (r + 1) * b], **tol
            )

    codes = naive_sinkhorn(full["view0"], w.SWAV["epsilon"], w.SWAV["iters"])
    for r, rk in enumerate(ranks):
        torch.testing.assert_close(rk["codes"], codes[r * b : (r + 1) * b], **tol)

    v = [full[k].clone().requires_grad_() for k in ("view0", "view1")]
    ref = naive_swav_two_views(*v, w.SWAV["temperature"], w.SWAV["epsilon"], w.SWAV["iters"])
    g = torch.autograd.grad(ref, v)
    torch.testing.assert_close(sum(rk["swav.loss"] for rk in ranks)[0] / world, ref.detach(), **tol)
    for r, rk in enumerate(ranks):
        for i in range(2):
            torch.testing.assert_close(rk[f"swav.grad.view{i}"] / world, g[i][r * b : (r + 1) * b], **tol)
