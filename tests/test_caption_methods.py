"""The caption-centred methods (issue 14): CLIP++ (label smoothing, text masking, image augmentation),
LaCLIP (rewrites), ALIGN (noisy captions), FDT (finite discrete tokens), DreamLIP's sub-captions.

- encoders.objectives_text against naive implementations of the papers' formulas written here (loops
  over rows and codes), values and gradients in fp32 and fp64, batch sizes 1, 2, 5, 13 on the chunked
  and plain paths; the distributed local-loss forms in two `gloo` processes;
- mllm.data.geoworld.rewrites: deterministic for a seed, and every rewrite / sub-caption / synthetic
  caption true of the scene graph (checked against the scene's objects); noisy captions false exactly
  when they say so, at the stated rate;
- the data switches (caption modes, text masking, image augmentation, sub-captions) and the model's FDT
  codebook (trained, saved, loaded, used for retrieval);
- bad configuration refused when the recipe loads, naming the key; the tiny recipes.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import _dist_caption_methods_worker as dist_worker
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TOWER
from helpers import subprocess_env
from PIL import Image
from safetensors.torch import load_file

from encoders.contrastive import ContrastiveModel, EncoderConfig
from encoders.objectives import OBJECTIVES, get_objective
from encoders.objectives_text import sparsemax
from encoders.text_tower import TextTowerConfig, build_text_tower
from encoders.towers import TowerConfig, build_tower
from mllm.data.caption_aug import augment_image, mask_tokens
from mllm.data.captions import CaptionCollator, CaptionDataset
from mllm.data.geoworld import write_world
from mllm.data.geoworld.language import long_caption
from mllm.data.geoworld.rewrites import (
    NOISY_ERROR_RATE,
    REGION_SYNONYMS,
    caption_variants,
    noisy_caption,
    rewrites,
    sub_captions,
    synthetic_caption,
)
from mllm.data.geoworld.sampling import stream, world_scene
from mllm.data.geoworld.vocab import COLOR_NAMES, NUMBER_WORDS, REGION_PHRASES, SHAPES

REPO = Path(__file__).resolve().parents[1]
SHAPES_BD = [(1, 4), (2, 3), (5, 8), (13, 16)]  # (B, D); 5 and 13 are not multiples of the chunk 4
CHUNKS = [4, 1000]
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-11)}


# ---------------------------------------------------------------- naive references (not calling encoders)
def naive_smoothed_ce(logits_row, pos, eps):
    """-sum_j q_j log softmax(z)_j with q = (1 - eps) one-hot(pos) + eps / K."""
    k = len(logits_row)
    logp = logits_row - torch.log(torch.exp(logits_row).sum())
    return -sum(((1 - eps) * (j == pos) + eps / k) * logp[j] for j in range(k))


def naive_clippp(img, txt, s, eps):
    b = len(img)
    l_i2t = sum(
        naive_smoothed_ce(torch.stack([s * img[i] @ txt[j] for j in range(b)]), i, eps) for i in range(b)
    )
    l_t2i = sum(
        naive_smoothed_ce(torch.stack([s * txt[i] @ img[j] for j in range(b)]), i, eps) for i in range(b)
    )
    return (l_i2t + l_t2i) / (2 * b)


def naive_sparsemax(z):
    """Martins & Astudillo's algorithm 1 on one vector: sort, the largest k with 1 + k z_(k) > sum_{j<=k}
    z_(j), τ = (sum of the top k - 1) / k, p = max(z - τ, 0)."""
    zs = sorted(z.tolist(), reverse=True)
    k = max(j for j in range(1, len(zs) + 1) if 1 + j * zs[j - 1] > sum(zs[:j]))
    top = sorted(range(len(zs)), key=lambda i: -z[i].item())[:k]
    tau = (sum(z[i] for i in top) - 1) / k
    return torch.clamp(z - tau, min=0)


def naive_fdt_embed(tokens, mask, codebook, normalizer):
    out = []
    for b in range(len(tokens)):
        real = [t for t in range(tokens.shape[1]) if mask is None or bool(mask[b, t])]
        r = torch.stack(
            [torch.stack([tokens[b, t] @ codebook[k] for t in real]).max() for k in range(len(codebook))]
        )
        w = naive_sparsemax(r) if normalizer == "sparsemax" else torch.exp(r) / torch.exp(r).sum()
        e = sum(w[k] * codebook[k] for k in range(len(codebook)))
        out.append(e / torch.sqrt((e * e).sum()))
    return torch.stack(out)


def naive_clip(img, txt, s):
    return naive_clippp(img, txt, s, 0.0)


def naive_group(q, patches):
    """SPARC/DreamLIP grouping of one image's patches [N, D] by one query q [D]."""
    n = len(patches)
    a = [q @ patches[j] for j in range(n)]
    lo, hi = torch.stack(a).min(), torch.stack(a).max()
    norm = [(x - lo) / (hi - lo) if hi > lo else x * 0 + 1 for x in a]
    kept = [x if x.item() >= 1.0 / n else x * 0 for x in norm]
    total = sum(kept)
    g = sum(kept[j] / total * patches[j] for j in range(n))
    return g / torch.sqrt((g * g).sum())


def naive_dreamlip(img, txt, sub, tokens, s, w_sub, w_group):
    """L_clip + w_sub L_sub + w_group L_group as DreamLipObjective's docstring states them, with loops."""
    b = len(img)
    k = len(sub) // b
    u = [[sub[i * k + m] for m in range(k)] for i in range(b)]
    i2s = []
    for i in range(b):
        den = sum(torch.exp(s * img[i] @ u[j][m]) for j in range(b) for m in range(k))
        i2s += [-torch.log(torch.exp(s * img[i] @ u[i][m]) / den) for m in range(k)]
    s2i = [
        -torch.log(torch.exp(s * u[i][m] @ img[i]) / sum(torch.exp(s * u[i][m] @ img[j]) for j in range(b)))
        for i in range(b)
        for m in range(k)
    ]
    l_sub = (sum(i2s) / len(i2s) + sum(s2i) / len(s2i)) / 2
    g2s, s2g = [], []
    for i in range(b):
        g = [naive_group(u[i][m], tokens[i]) for m in range(k)]
        for m in range(k):
            g2s.append(
                -torch.log(
                    torch.exp(s * g[m] @ u[i][m]) / sum(torch.exp(s * g[m] @ u[i][j]) for j in range(k))
                )
            )
            s2g.append(
                -torch.log(
                    torch.exp(s * u[i][m] @ g[m]) / sum(torch.exp(s * u[i][m] @ g[j]) for j in range(k))
                )
            )
    l_group = (sum(g2s) / len(g2s) + sum(s2g) / len(s2g)) / 2
    return naive_clip(img, txt, s) + w_sub * l_sub + w_group * l_group


def make(b, d, dtype, seed=0, n=3, length=5, k=6):
    g = torch.Generator().manual_seed(seed * 1000 + b * 31 + d)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    return {
        "img": unit(b, d).to(dtype).requires_grad_(),
        "txt": unit(b, d).to(dtype).requires_grad_(),
        "img_tokens": unit(b, n, d).to(dtype).requires_grad_(),
        "txt_tokens": unit(b, length, d).to(dtype).requires_grad_(),
        "txt_mask": torch.arange(length)[None, :] < lengths[:, None],
        "codebook": torch.randn(k, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(),
        "scale": torch.tensor(3.5, dtype=dtype, requires_grad=True),
    }


def compare(ours, ref, x, wrt):
    tol = TOL[x["img"].dtype]
    torch.testing.assert_close(ours, ref.to(ours.dtype), **tol)
    inputs = [x[k] for k in wrt]
    g_ours = torch.autograd.grad(ours, inputs, allow_unused=True)
    g_ref = torch.autograd.grad(ref, inputs, allow_unused=True)
    for k, a, b in zip(wrt, g_ours, g_ref):
        a = torch.zeros_like(x[k]) if a is None else a
        b = torch.zeros_like(x[k]) if b is None else b
        torch.testing.assert_close(a, b, **tol, msg=lambda m, k=k: f"grad wrt {k}: {m}")


# ---------------------------------------------------------------- CLIP++
@pytest.mark.parametrize("b,d", SHAPES_BD)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_clippp(b, d, chunk, dtype, eps):
    x = make(b, d, dtype)
    loss, stats = get_objective("clippp", chunk=chunk, label_smoothing=eps)(x["img"], x["txt"], x["scale"])
    ref = naive_clippp(x["img"], x["txt"], x["scale"], eps)
    compare(loss, ref, x, ("img", "txt", "scale"))
    assert set(stats) >= {"loss_i2t", "loss_t2i", "scale", "acc_i2t", "acc_t2i"}


def test_clippp_without_smoothing_is_clip_and_smoothing_changes_it():
    x = make(5, 8, torch.float64)
    clip, _ = get_objective("clip")(x["img"], x["txt"], x["scale"])
    plain, _ = get_objective("clippp", label_smoothing=0.0)(x["img"], x["txt"], x["scale"])
    smooth, _ = get_objective("clippp")(x["img"], x["txt"], x["scale"])
    torch.testing.assert_close(plain, clip, rtol=1e-12, atol=1e-12)
    assert abs(float((smooth - clip).detach())) > 1e-3
    assert get_objective("clippp").label_smoothing == 0.1  # the paper's value


# ---------------------------------------------------------------- FDT
@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_sparsemax_against_the_algorithm(n):
    g = torch.Generator().manual_seed(n)
    for scale in (0.1, 1.0, 5.0):
        z = (torch.randn(3, n, generator=g, dtype=torch.float64) * scale).requires_grad_()
        ours = sparsemax(z)
        ref = torch.stack([naive_sparsemax(row) for row in z])
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours.sum(-1), torch.ones(3, dtype=torch.float64))
        w = torch.randn(3, n, generator=g, dtype=torch.float64)
        ga = torch.autograd.grad((ours * w).sum(), z)[0]
        gb = torch.autograd.grad((ref * w).sum(), z)[0]
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)
    big = sparsemax(torch.tensor([[3.0, 0.0, -1.0, 0.5]]))
    assert big.tolist() == [[1.0, 0.0, 0.0, 0.0]]  # sparse: one clear winner takes all the weight


@pytest.mark.parametrize("b,d", SHAPES_BD)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalizer", ["sparsemax", "softmax"])
def test_fdt(b, d, chunk, dtype, normalizer):
    x = make(b, d, dtype)
    obj = get_objective("fdt", chunk=chunk, codebook_size=6, normalizer=normalizer)
    extra = {k: x[k] for k in ("img_tokens", "txt_tokens", "txt_mask", "codebook")}
    loss, _ = obj(x["img"], x["txt"], x["scale"], **extra)
    ei = naive_fdt_embed(x["img_tokens"], None, x["codebook"], normalizer)
    et = naive_fdt_embed(x["txt_tokens"], x["txt_mask"], x["codebook"], normalizer)
    ref = naive_clip(ei, et, x["scale"])
    compare(loss, ref, x, ("img_tokens", "txt_tokens", "codebook", "scale"))


def test_fdt_ignores_padded_tokens_and_checks_its_inputs():
    x = make(3, 4, torch.float64)
    obj = get_objective("fdt", codebook_size=6)
    extra = {k: x[k] for k in ("img_tokens", "txt_tokens", "txt_mask", "codebook")}
    base, _ = obj(x["img"], x["txt"], x["scale"], **extra)
    noisy = x["txt_tokens"].detach().clone()
    noisy[~x["txt_mask"]] = 100.0  # padding, whatever it holds, is not a token
    again, _ = obj(x["img"], x["txt"], x["scale"], **dict(extra, txt_tokens=noisy))
    torch.testing.assert_close(base, again)
    with pytest.raises(ValueError, match="codebook must be"):
        obj(x["img"], x["txt"], x["scale"], **dict(extra, codebook=x["codebook"][:5]))
    with pytest.raises(ValueError, match="missing extra inputs"):
        obj(x["img"], x["txt"], x["scale"], **{k: v for k, v in extra.items() if k != "codebook"})


# ---------------------------------------------------------------- DreamLIP
@pytest.mark.parametrize("b,d", SHAPES_BD)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", [(1, 1), (3, 4), (4, 9)])
def test_dreamlip(b, d, dtype, k, n):
    x = make(b, d, dtype, n=n)
    g = torch.Generator().manual_seed(b * 7 + k)
    x["sub_txt"] = F.normalize(torch.randn(b * k, d, generator=g, dtype=torch.float64), dim=-1)
    x["sub_txt"] = x["sub_txt"].to(dtype).requires_grad_()
    obj = get_objective("dreamlip", w_sub=0.5, w_group=2.0)
    loss, stats = obj(x["img"], x["txt"], x["scale"], sub_txt=x["sub_txt"], img_tokens=x["img_tokens"])
    ref = naive_dreamlip(x["img"], x["txt"], x["sub_txt"], x["img_tokens"], x["scale"], 0.5, 2.0)
    compare(loss, ref, x, ("img", "txt", "sub_txt", "img_tokens", "scale"))
    assert {"loss_clip", "loss_sub", "loss_group"} <= set(stats)
    if k == 1:  # one sub-caption: nothing to tell apart within the image
        assert float(stats["loss_group"]) == pytest.approx(0.0, abs=1e-6)


def test_grouping_follows_the_sub_caption():
    """A sub-caption equal to one patch groups (mostly) that patch: the grouped embedding is near it."""
    patches = F.normalize(torch.eye(6, dtype=torch.float64)[:5] + 0.05, dim=-1)[None]  # [1, 5, 6]
    from encoders.objectives_text import group_patches

    g = group_patches(patches[:, [2]], patches)
    assert float(g[0, 0] @ patches[0, 2]) > 0.99


# ---------------------------------------------------------------- ALIP
def naive_alip(img, txt, syn, s, means, gamma):
    """mean_i [g(t_i.c_i, μ_tc) g(x_i.t_i, μ_it) l_it(i) + g(x_i.c_i, μ_ic) l_ic(i)], g(v, μ) =
    min(1, exp(gamma (v - μ))) taken without gradient; l_ab(i) = (CE_i(a->b) + CE_i(b->a)) / 2."""
    b = len(img)

    def ce(q, keys, i):
        return -torch.log(
            torch.exp(s * q[i] @ keys[i]) / sum(torch.exp(s * q[i] @ keys[j]) for j in range(b))
        )

    def gate(v, mu):
        return min(1.0, float(torch.exp(gamma * (v.detach() - mu))))

    total = 0.0
    for i in range(b):
        l_it = (ce(img, txt, i) + ce(txt, img, i)) / 2
        l_ic = (ce(img, syn, i) + ce(syn, img, i)) / 2
        w_s = gate(txt[i] @ syn[i], means[0])
        w_t = gate(img[i] @ txt[i], means[1])
        w_c = gate(img[i] @ syn[i], means[2])
        total = total + w_s * w_t * l_it + w_c * l_ic
    return total / b


def _alip_batch_means(img, txt, syn):
    return [
        float((txt * syn).sum(-1).mean()),
        float((img * txt).sum(-1).mean()),
        float((img * syn).sum(-1).mean()),
    ]


@pytest.mark.parametrize("b,d", SHAPES_BD)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("started", [True, False])
def test_alip(b, d, chunk, dtype, started):
    x = make(b, d, dtype)
    g = torch.Generator().manual_seed(b + d)
    x["syn_txt"] = (
        F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1).to(dtype).requires_grad_()
    )
    stored = [0.2, 0.0, -0.1]
    means = torch.tensor(stored, dtype=torch.float64)
    flag = torch.tensor([1.0 if started else 0.0], dtype=torch.float64)
    obj = get_objective("alip", chunk=chunk, gamma=4.0, momentum=0.9)
    loss, stats = obj(
        x["img"], x["txt"], x["scale"], syn_txt=x["syn_txt"], alip_means=means, alip_started=flag
    )
    batch = _alip_batch_means(x["img"].detach(), x["txt"].detach(), x["syn_txt"].detach())
    used = stored if started else batch
    ref = naive_alip(x["img"], x["txt"], x["syn_txt"], x["scale"], used, 4.0)
    compare(loss, ref, x, ("img", "txt", "syn_txt", "scale"))
    expect = [0.9 * m + 0.1 * v for m, v in zip(stored, batch)] if started else batch
    torch.testing.assert_close(means, torch.tensor(expect, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert float(flag) == 1.0 and {"gate_language", "gate_text", "gate_caption"} <= set(stats)


def test_alip_gates_down_weight_inconsistent_samples():
    """A sample whose raw text disagrees with its synthetic caption (and its image) weighs less."""
    d = 8
    img = F.normalize(
        torch.randn(4, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    syn = img.clone()
    txt = img.clone()
    txt[3] = -img[3]  # the noisy raw text
    means, flag = torch.zeros(3, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    obj = get_objective("alip", gamma=5.0)
    _, stats = obj(img, txt, torch.tensor(2.0), syn_txt=syn, alip_means=means, alip_started=flag)
    assert float(stats["gate_language"]) < 0.9 and float(stats["gate_caption"]) == pytest.approx(1.0)


# ---------------------------------------------------------------- distributed: 2 gloo ranks vs one process
def test_distributed_equals_single_process(tmp_path):
    """Each rank holds half the batch; the mean of the ranks' losses = the naive loss on the whole batch;
    a rank's gradient wrt its local features / world = the whole-batch gradient's slice; the replicated
    parameters' (scale, codebook) gradients averaged over ranks (DDP) = the whole-batch ones."""
    from mllm.training.distributed import free_port

    w = dist_worker
    world = 2
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "_dist_caption_methods_worker.py"), str(tmp_path)],
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
        x = {k: v.clone().requires_grad_() if v.is_floating_point() else v for k, v in full.items()}
        if name == "clippp":
            ref = naive_clippp(x["img"], x["txt"], x["scale"], cfg["label_smoothing"])
            local = ["img", "txt"]
        elif name == "alip":
            fresh = case == "alip_fresh"
            batch_means = _alip_batch_means(full["img"], full["txt"], full["syn_txt"])
            used = batch_means if fresh else list(w.ALIP_MEANS)
            ref = naive_alip(x["img"], x["txt"], x["syn_txt"], x["scale"], used, cfg["gamma"])
            local = ["img", "txt", "syn_txt"]
            m = cfg["momentum"]
            expect = (
                batch_means if fresh else [m * a + (1 - m) * v for a, v in zip(w.ALIP_MEANS, batch_means)]
            )
            for rk in ranks:  # every rank moved its running means by the global batch's
                torch.testing.assert_close(rk[f"{case}.means"], torch.tensor(expect, dtype=torch.float64))
        elif name == "dreamlip":
            ref = naive_dreamlip(
                x["img"], x["txt"], x["sub_txt"], x["img_tokens"], x["scale"], cfg["w_sub"], cfg["w_group"]
            )
            local = ["img", "txt", "sub_txt", "img_tokens"]
        else:
            ei = naive_fdt_embed(x["img_tokens"], None, x["codebook"], cfg["normalizer"])
            et = naive_fdt_embed(x["txt_tokens"], x["txt_mask"], x["codebook"], cfg["normalizer"])
            ref = naive_clip(ei, et, x["scale"])
            local = ["img_tokens", "txt_tokens"]
        shared = ["scale"] + (["codebook"] if name == "fdt" else [])
        keys = local + shared
        grads = dict(zip(keys, torch.autograd.grad(ref, [x[k] for k in keys])))
        mean_loss = sum(rk[f"{case}.loss"] for rk in ranks) / world
        torch.testing.assert_close(mean_loss[0], ref.detach(), rtol=1e-10, atol=1e-10, msg=f"{case} loss")
        for r, rk in enumerate(ranks):
            for k in local:
                rows = b * w.N_SUB if k == "sub_txt" else b
                torch.testing.assert_close(
                    rk[f"{case}.grad.{k}"] / world,
                    grads[k][r * rows : (r + 1) * rows],
                    rtol=1e-9,
                    atol=1e-12,
                    msg=lambda m, where=f"{case} rank {r} grad {k}": f"{where}: {m}",
                )
        for k in shared:
            mean_g = sum(rk[f"{case}.grad.{k}"] for rk in ranks) / world
            torch.testing.assert_close(
                mean_g.reshape(grads[k].shape), grads[k], rtol=1e-9, atol=1e-12, msg=f"{case} grad {k}"
            )


# ---------------------------------------------------------------- GeoWorld captions: deterministic and true
def _scenes(n=300, seed=11):
    return [world_scene(stream(seed, "train", i), 64, math_frac=0.15, max_shapes=5) for i in range(n)]


def _words(text):
    return set(re.findall(r"[a-z]+", text.lower()))


def _says_object(text, s):
    """Whether `text` names shape `s` with all its attributes and in one of its region's phrasings."""
    low = text.lower()
    ok = all(w in _words(low) for w in (s.size, s.color, s.kind))
    if s.orientation and s.kind in ("triangle", "arrow"):
        ok &= f"pointing {s.orientation}" in low
    if s.orientation and s.kind == "rectangle":
        ok &= (s.orientation in low) or (
            "horizontally" if s.orientation == "horizontal" else "vertically"
        ) in low
    return ok and any(p in low for p in REGION_SYNONYMS[s.region])


def test_caption_variants_are_deterministic_for_a_seed():
    scenes = _scenes(40)
    a = [caption_variants(sc, stream(5, "caption-variants", i)) for i, sc in enumerate(scenes)]
    b = [caption_variants(sc, stream(5, "caption-variants", i)) for i, sc in enumerate(scenes)]
    c = [caption_variants(sc, stream(6, "caption-variants", i)) for i, sc in enumerate(scenes)]
    assert a == b and a != c


def test_rewrites_are_true_complete_and_differ_from_the_exact_caption():
    n_shapes = 0
    for i, sc in enumerate(_scenes()):
        rw = rewrites(sc, random.Random(i))
        exact = long_caption(sc)
        assert 1 <= len(rw) == len(set(rw)) and exact not in rw
        for text in rw:
            if sc.figure is not None:
                assert exact.rstrip(".")[1:].lower() in text.lower()  # the figure's caption, re-framed
                continue
            n_shapes += 1
            for s in sc.shapes:
                assert _says_object(text, s), (text, s)
            # no colour or shape the scene does not have
            assert _words(text) & set(COLOR_NAMES) == {s.color for s in sc.shapes}, text
            assert _words(text) & set(SHAPES) == {s.kind for s in sc.shapes}, text
            count = re.search(r"\b(" + "|".join(NUMBER_WORDS) + r") shapes?\b", text)
            assert count is None or count.group(1) == NUMBER_WORDS[len(sc.shapes)], text
    assert n_shapes > 500


def test_sub_captions_are_each_true_of_the_scene():
    for sc in _scenes():
        subs = sub_captions(sc)
        if sc.figure is not None:
            assert subs[0].startswith("The image shows a triangle")
            continue
        n = len(sc.shapes)
        assert (
            subs[0]
            == f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} shape{'s' if n > 1 else ''} in the image."
        )
        assert len(subs) == n + 1
        for text in subs[1:]:
            # each object sentence names exactly one scene object, fully and in its own region
            match = [s for s in sc.shapes if _says_object(text, s) and REGION_PHRASES[s.region] in text]
            assert match, text
            assert len(_words(text) & set(COLOR_NAMES)) == 1 and len(_words(text) & set(SHAPES)) == 1


def test_synthetic_captions_are_true():
    for i, sc in enumerate(_scenes()):
        text = synthetic_caption(sc, random.Random(i))
        if sc.figure is None:
            named = set(re.findall(r"\b(" + "|".join(COLOR_NAMES) + r") (" + "|".join(SHAPES) + r")\b", text))
            assert {f"{c} {k}" for c, k in named} == sc.objects(), text


def test_noisy_captions_are_false_exactly_when_marked_at_the_stated_rate():
    wrong_n, total = 0, 0
    for i, sc in enumerate(_scenes(600, seed=3)):
        text, wrong = noisy_caption(sc, random.Random(i))
        total += 1
        wrong_n += wrong
        if sc.figure is not None:
            assert ("square" in text) == wrong
            continue
        named = re.findall(r"\b(" + "|".join(COLOR_NAMES) + r") (" + "|".join(SHAPES) + r")\b", text)
        false = [f"{c} {k}" for c, k in named if f"{c} {k}" not in sc.objects()]
        assert bool(false) == wrong, (text, sc.objects())
    rate = wrong_n / total
    assert abs(rate - NOISY_ERROR_RATE) < 4 * (NOISY_ERROR_RATE * (1 - NOISY_ERROR_RATE) / total) ** 0.5


# ---------------------------------------------------------------- data switches
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("geoworld")
    write_world(
        out,
        seed=3,
        n=24,
        size=48,
        n_eval=16,
        mmvp_pairs=8,
        pope_questions=6,
        refcoco_n=4,
        mathverse_problems=1,
        mmvp_vlm_pairs=2,
    )
    return out


def _pre(images):
    return torch.stack([torch.tensor(list(im.getdata()), dtype=torch.float32).reshape(-1) for im in images])


def test_caption_modes_pick_their_field(world):
    import json

    rows = [json.loads(x) for x in (world / "captions.jsonl").read_text().splitlines()]
    for mode, allowed in (
        ("noisy", lambda r: {r["noisy"]}),
        ("rewrite", lambda r: {r["long"], *r["rewrites"]}),
        ("synthetic", lambda r: {r["synthetic"]}),
        ("description", lambda r: {" ".join(r["sub_captions"])}),
    ):
        ds = CaptionDataset(world / "captions.jsonl", world, _pre, mode)
        random.seed(0)
        seen = set()
        for _ in range(3):
            for i, r in enumerate(rows):
                t = ds[i]["text"]
                assert t in allowed(r), (mode, t)
                seen.add(t)
        if mode == "rewrite":  # LaCLIP: the original and the rewrites are all drawn
            assert any(r["long"] in seen for r in rows) and any(set(r["rewrites"]) & seen for r in rows)


def test_sub_captions_and_text_masking_reach_the_batch(world, tokenizer):
    ds = CaptionDataset(
        world / "captions.jsonl", world, _pre, "long", sub_captions=3, image_augment="photometric"
    )
    text = build_text_tower(
        TextTowerConfig(
            config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=96,
            ),
            max_length=96,
        ),
        tokenizer,
    )
    random.seed(1)
    items = [ds[i] for i in range(4)]
    for it, i in zip(items, range(4)):
        assert len(it["sub_texts"]) == 3 and set(it["sub_texts"]) <= set(ds.rows[i]["sub_captions"])
    plain = CaptionCollator(text.tokenize)(items)
    masked = CaptionCollator(text.tokenize, text_mask=0.5)(items)
    assert plain["sub_input_ids"].shape[0] == 12
    syn = CaptionDataset(world / "captions.jsonl", world, _pre, "noisy", synthetic=True)
    batch = CaptionCollator(text.tokenize)([syn[i] for i in range(4)])
    assert [syn[i]["syn_text"] for i in range(4)] == [syn.rows[i]["synthetic"] for i in range(4)]
    assert batch["syn_input_ids"].shape[0] == 4
    assert (masked["attention_mask"].sum(1) <= plain["attention_mask"].sum(1)).all()
    assert masked["attention_mask"].sum() < plain["attention_mask"].sum()


def test_mask_tokens_keeps_bos_eos_and_drops_at_the_rate():
    ids = torch.tensor([[1, *range(10, 40), 2], [1, 10, 2] + [0] * 29])
    mask = (torch.arange(32)[None] < torch.tensor([[32], [3]])).long()
    same = mask_tokens(ids, mask, 0.0)
    assert same[0] is ids
    rng = random.Random(0)
    kept = 0
    for _ in range(200):
        out, m = mask_tokens(ids, mask, 0.3, rng)
        n = int(m[0].sum())
        assert out[0, 0] == 1 and out[0, n - 1] == 2 and n >= 3
        body = out[0, 1 : n - 1].tolist()
        assert body == sorted(body) and set(body) <= set(range(10, 40))  # order kept, nothing new
        assert out[1, :3].tolist() == [1, 10, 2] and int(m[1].sum()) == 3  # too short to drop from
        kept += n - 2
    assert abs(kept / (200 * 30) - 0.7) < 0.03
    with pytest.raises(ValueError, match="text_mask"):
        mask_tokens(ids, mask, 1.0)


def test_augment_image_keeps_size_and_hue_and_is_seeded():
    img = Image.new("RGB", (48, 48), (255, 255, 255))
    img.paste((220, 30, 30), (10, 10, 30, 30))
    a = augment_image(img, "photometric", random.Random(3))
    b = augment_image(img, "photometric", random.Random(3))
    assert a.size == img.size and list(a.getdata()) == list(b.getdata())
    r, g, bl = a.getpixel((20, 20))
    assert r > 150 and g < 90 and bl < 90  # still red
    with pytest.raises(ValueError, match="image_augment"):
        augment_image(img, "flip")


# ---------------------------------------------------------------- the model's FDT codebook
def test_fdt_model_trains_saves_and_retrieves_with_its_codebook(tokenizer, tmp_path):
    torch.manual_seed(0)
    cfg = EncoderConfig(
        objective="fdt",
        objective_args={"codebook_size": 5},
        embed_dim=16,
        text=TextTowerConfig(
            config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=96,
            ),
            max_length=96,
        ),
    )
    model = ContrastiveModel(
        build_tower(TowerConfig(type="clip", config=TINY_TOWER, select_layer=-1)),
        build_text_tower(cfg.text, tokenizer),
        cfg,
    )
    assert "heads.objective_state.codebook" in dict(model.named_parameters())
    pv = torch.randn(3, 3, TINY_TOWER.get("image_size", 32), TINY_TOWER.get("image_size", 32))
    ids, mask = model.text_tower.tokenize(["a red circle", "a blue square on the left", "two shapes"])
    out = model(pixel_values=pv, input_ids=ids, attention_mask=mask)
    out.loss.backward()
    assert model.heads.objective_state.codebook.grad.abs().sum() > 0
    # the global embeddings are the FDT ones (weighted sums of codes, so in the codes' span)
    emb = model.encode_image(pv).detach()
    cb = model.heads.objective_state.codebook.detach()
    coef = torch.linalg.lstsq(cb.T, emb.T).solution
    torch.testing.assert_close(cb.T @ coef, emb.T, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path / "m")
    again = ContrastiveModel.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(again.heads.objective_state.codebook, cb)
    torch.testing.assert_close(again.encode_image(pv), model.eval().encode_image(pv))


# ---------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    "over,key",
    [
        (
            ["model.encoder.objective=clippp", "model.encoder.objective_args.label_smoothing=1.0"],
            "label_smoothing",
        ),
        (
            ["model.encoder.objective=clippp", "model.encoder.objective_args.label_smoothing=-0.1"],
            "label_smoothing",
        ),
        (["model.encoder.objective=fdt", "model.encoder.objective_args.codebook_size=0"], "codebook_size"),
        (["model.encoder.objective=fdt", "model.encoder.objective_args.normalizer=argmax"], "normalizer"),
        (["model.encoder.objective=clip", "model.encoder.objective_args.codebook_size=8"], "codebook_size"),
        (
            ["model.encoder.objective=fdt", "model.encoder.objective_args.label_smoothing=0.1"],
            "label_smoothing",
        ),
        (["stages.contrastive.data.text_mask=1.0"], "data.text_mask"),
        (["stages.contrastive.data.text_mask=-0.2"], "data.text_mask"),
        (["stages.contrastive.data.image_augment=flip"], "data.image_augment"),
        (["stages.contrastive.data.caption=paraphrase"], "data.caption"),
        (["stages.contrastive.data.sub_captions=-1"], "data.sub_captions"),
        (["model.encoder.objective=alip", "model.encoder.objective_args.momentum=1.0"], "momentum"),
        (["model.encoder.objective=alip", "model.encoder.objective_args.gamma=-1"], "gamma"),
        (["stages.contrastive.data.sub_captions=2"], "data.sub_captions"),  # DreamLIP's, not CLIP's
        (["model.encoder.objective=dreamlip"], "data.sub_captions"),  # DreamLIP without sub-captions
        (
            [
                "model.encoder.objective=dreamlip",
                "stages.contrastive.data.sub_captions=2",
                "model.encoder.objective_args.w_group=-1",
            ],
            "w_group",
        ),
    ],
)
def test_bad_options_are_refused_when_the_recipe_loads(over, key):
    from encoders.common import ConfigError
    from mllm.config import load_recipe

    with pytest.raises(ConfigError, match=re.escape(key)):
        load_recipe("clip-tiny", over)


def test_caption_switches_on_another_kind_of_stage_are_refused():
    from encoders.common import ConfigError
    from mllm.config import load_recipe

    for key, value in (("text_mask", 0.1), ("image_augment", "photometric"), ("sub_captions", 2)):
        with pytest.raises(ConfigError, match=rf"stages\.align\.data\.{key}: read only by `contrastive`"):
            load_recipe("tiny-geoworld", [f"stages.align.data.{key}={value}"])


RECIPES = {
    "clippp-tiny": ("clippp", {"label_smoothing": 0.1}, {"text_mask": 0.15, "image_augment": "photometric"}),
    "laclip-tiny": ("clip", {}, {"caption": "rewrite"}),
    "align-tiny": ("clip", {}, {"caption": "noisy"}),
    "fdt-tiny": ("fdt", {"codebook_size": 64, "normalizer": "sparsemax"}, {}),
    "dreamlip-tiny": ("dreamlip", {"w_sub": 1.0, "w_group": 1.0}, {"caption": "short", "sub_captions": 3}),
    "alip-tiny": ("alip", {"gamma": 5.0, "momentum": 0.99}, {"caption": "noisy"}),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_tiny_recipes_differ_from_clip_tiny_only_in_what_they_say(name):
    from mllm.config import load_recipe, to_dict

    objective, args, data = RECIPES[name]
    tree, clip = to_dict(load_recipe(name)), to_dict(load_recipe("clip-tiny"))
    for t in (tree, clip):
        t.pop("name")
    enc = tree["model"]["encoder"]
    assert (enc.pop("objective"), enc.pop("objective_args")) == (objective, args) and objective in OBJECTIVES
    clip["model"]["encoder"].pop("objective"), clip["model"]["encoder"].pop("objective_args")
    clip["stages"][0]["data"].update(data)
    assert tree == clip
    assert (REPO / "train" / "recipes" / f"{name}.yaml").is_file()
