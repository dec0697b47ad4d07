"""encoders.objectives against direct, naive computations of each formula (written here, loops where the
formula is a sum), values and gradients, chunked and plain paths; the distributed local-loss forms in two
`gloo` processes; and clear errors on bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import _dist_objectives_worker as dist_worker
import pytest
import torch
import torch.nn.functional as F
from helpers import subprocess_env
from safetensors.torch import load_file

from encoders.objectives import OBJECTIVES, get_objective, init_logit_params, register_objective

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(2, 3), (5, 8), (13, 16)]  # (B, D)
CHUNKS = [4, 1000]  # 4: chunked kernels (ragged last chunk for B=5, 13); 1000: the plain full-matrix path


# ---------------------------------------------------------------- naive references (not calling encoders)
def naive_infonce(img, txt, s, exclude_positive=False):
    b = img.shape[0]
    logits = s * img @ txt.T
    i2t = t2i = 0.0
    for i in range(b):
        keep = [j for j in range(b) if not (exclude_positive and j == i)]
        i2t = i2t - logits[i, i] + torch.logsumexp(logits[i, keep], 0)
        t2i = t2i - logits[i, i] + torch.logsumexp(logits[keep, i], 0)
    return (i2t / b + t2i / b) / 2


def naive_siglip(img, txt, s, bias):
    b = img.shape[0]
    total = 0.0
    for i in range(b):
        for j in range(b):
            z = 1.0 if i == j else -1.0
            total = total - torch.log(torch.sigmoid(z * (s * img[i] @ txt[j] + bias)))
    return total / b


def naive_filip(it, tt, tm, s):
    b = it.shape[0]
    s_i2t = torch.zeros(b, b, dtype=it.dtype)
    s_t2i = torch.zeros(b, b, dtype=it.dtype)  # [text j, image i]
    for i in range(b):
        for j in range(b):
            tok = tt[j][tm[j]]  # real text tokens only
            sim = it[i] @ tok.T  # [N, L_j]
            s_i2t[i, j] = sim.max(1).values.mean()
            s_t2i[j, i] = sim.max(0).values.mean()
    labels = torch.arange(b)
    return (F.cross_entropy(s * s_i2t, labels) + F.cross_entropy(s * s_t2i, labels)) / 2


def naive_negclip(img, txt, hard_txt, s, hard_img=None, hard_img_txt=None, hard_img_hard_txt=None):
    """neg_clip's batch: images [img; hard_img], texts [txt; hard_img_txt; hard_txt; hard_img_hard_txt];
    logits_per_image = s * images @ texts.T, logits_per_text = s * texts[:len(images)] @ images.T."""
    if hard_img is not None:
        img, txt = torch.cat([img, hard_img]), torch.cat([txt, hard_img_txt])
    if hard_img_hard_txt is not None:
        hard_txt = torch.cat([hard_txt, hard_img_hard_txt])
    labels = torch.arange(img.shape[0])
    i2t = F.cross_entropy(s * img @ torch.cat([txt, hard_txt]).T, labels)
    t2i = F.cross_entropy(s * txt @ img.T, labels)
    return (i2t + t2i) / 2


def naive_uniformity(a, c, t=2.0):
    vals = [
        torch.exp(-t * (a[i] - c[j]).pow(2).sum()) for i in range(len(a)) for j in range(len(c)) if i != j
    ]
    return torch.log(torch.stack(vals).mean())


def naive_unif_align(img, txt, s, w_align=1.0, w_unif=1.0, cross=True, mix="fahim"):
    """Fahim et al.: L_CLIP + L_align + (U_img + U_txt)/2 + U_cross; mix "mean": the mean of the three."""
    align = torch.stack([(img[i] - txt[i]).pow(2).sum() for i in range(len(img))]).mean()
    u_img, u_txt = naive_uniformity(img, img), naive_uniformity(txt, txt)
    if not cross:
        unif = (u_img + u_txt) / 2
    elif mix == "fahim":
        unif = (u_img + u_txt) / 2 + naive_uniformity(img, txt)
    else:
        unif = (u_img + u_txt + naive_uniformity(img, txt)) / 3
    return naive_infonce(img, txt, s) + w_align * align + w_unif * unif


def naive_dcl_paper(img, txt, s):
    """Yeh et al.'s DCL with the image and its caption as the two views: for anchor x_i, the negatives are
    every view of every other sample, y_k and x_k for k != i; the mean over the 2B anchors."""
    b = img.shape[0]
    total = 0.0
    for a, o in ((img, txt), (txt, img)):
        for i in range(b):
            neg = [s * a[i] @ o[k] for k in range(b) if k != i] + [
                s * a[i] @ a[k] for k in range(b) if k != i
            ]
            total = total - s * a[i] @ o[i] + torch.logsumexp(torch.stack(neg), 0)
    return total / (2 * b)


# ---------------------------------------------------------------- data
def unit(*shape, g):
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).requires_grad_()


def make(b, d, seed=0, n_img=3, n_txt=5):
    g = torch.Generator().manual_seed(seed * 1000 + b * 31 + d)
    mask = torch.rand(b, n_txt, generator=g) > 0.5
    mask[torch.arange(b), torch.randint(0, n_txt, (b,), generator=g)] = True  # one real token, anywhere
    return {
        "img": unit(b, d, g=g),
        "txt": unit(b, d, g=g),
        "img_tokens": unit(b, n_img, d, g=g),
        "txt_tokens": unit(b, n_txt, d, g=g),
        "txt_mask": mask,
        "hard_txt": unit(b, d, g=g),
        "hard_img": unit(b, d, g=g),
        "hard_img_txt": unit(b, d, g=g),
        "hard_img_hard_txt": unit(b, d, g=g),
        "scale": torch.tensor(3.5, dtype=torch.float64, requires_grad=True),
        "bias": torch.tensor(-1.5, dtype=torch.float64, requires_grad=True),
    }


def compare(ours_fn, naive_fn, data, wrt):
    """Loss values and autograd.grad wrt the named inputs agree to float64 precision."""
    inputs = [data[k] for k in wrt]
    ours = ours_fn()
    ref = naive_fn()
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-10, atol=1e-10)
    g_ours = torch.autograd.grad(ours, inputs)
    g_ref = torch.autograd.grad(ref, inputs)
    for k, a, b in zip(wrt, g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m, k=k: f"grad wrt {k}: {m}")


# ---------------------------------------------------------------- single process vs naive
@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_clip_and_dcl(b, d, chunk):
    x = make(b, d)
    for name, excl in (("clip", False), ("dcl", True)):
        obj = get_objective(name, chunk=chunk)
        compare(
            lambda obj=obj: obj(x["img"], x["txt"], x["scale"], None)[0],
            lambda excl=excl: naive_infonce(x["img"], x["txt"], x["scale"], excl),
            x,
            ("img", "txt", "scale"),
        )


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_dcl_paper_form(b, d, chunk):
    x = make(b, d)
    obj = get_objective("dcl", chunk=chunk, form="paper")
    compare(
        lambda: obj(x["img"], x["txt"], x["scale"], None)[0],
        lambda: naive_dcl_paper(x["img"], x["txt"], x["scale"]),
        x,
        ("img", "txt", "scale"),
    )


def fp32(x: dict) -> dict:
    return {k: v.detach().float().requires_grad_() if v.is_floating_point() else v for k, v in x.items()}


def compare_fp32(ours_fn, naive_fn, data, wrt):
    """As `compare`, in float32: values and gradients to float32 precision."""
    inputs = [data[k] for k in wrt]
    ours, ref = ours_fn(), naive_fn()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-5, atol=1e-5)
    for k, a, r in zip(wrt, torch.autograd.grad(ours, inputs), torch.autograd.grad(ref, inputs)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"grad wrt {k}: {m}")


@pytest.mark.parametrize("b", [2, 3, 7])
@pytest.mark.parametrize("chunk", [2, 1000])  # 2: chunked, ragged for B = 3, 7
def test_dcl_forms_and_unif_mix_fp32(b, chunk):
    """Both DCL forms and both unif_align mixes against the naive formulas in float32 (B >= 2: both need
    a negative / a distinct pair)."""
    x = fp32(make(b, 6))
    args = (x["img"], x["txt"], x["scale"])
    cases = [
        (get_objective("dcl", chunk=chunk), lambda: naive_infonce(*args, exclude_positive=True)),
        (get_objective("dcl", chunk=chunk, form="paper"), lambda: naive_dcl_paper(*args)),
        (get_objective("unif_align", chunk=chunk), lambda: naive_unif_align(*args)),
        (
            get_objective("unif_align", chunk=chunk, unif_mix="mean"),
            lambda: naive_unif_align(*args, mix="mean"),
        ),
    ]
    for obj, ref in cases:
        compare_fp32(lambda obj=obj: obj(*args, None)[0], ref, x, ("img", "txt", "scale"))


def test_dcl_and_unif_align_options_checked():
    x = make(1, 4)
    for obj in (get_objective("dcl", form="paper"), get_objective("unif_align", unif_mix="mean")):
        with pytest.raises(ValueError, match="at least 2 pairs"):
            obj(x["img"], x["txt"], x["scale"], None)
    with pytest.raises(ValueError, match=r"form must be one of \('cross_modal', 'paper'\), got 'simclr'"):
        get_objective("dcl", form="simclr")
    with pytest.raises(ValueError, match=r"unif_mix must be one of \('fahim', 'mean'\)"):
        get_objective("unif_align", unif_mix="sum")
    assert get_objective("dcl").form == "cross_modal" and get_objective("unif_align").unif_mix == "fahim"


def test_unif_align_default_weighs_cross_uniformity_fully():
    """The default (Fahim et al.) adds U_cross whole to the in-modal mean; "mean" gives it a third."""
    x = make(6, 8)
    st_f = get_objective("unif_align")(x["img"], x["txt"], x["scale"], None)[1]
    st_m = get_objective("unif_align", unif_mix="mean")(x["img"], x["txt"], x["scale"], None)[1]
    in_modal = (3 * st_m["unif"] - st_m["unif_cross"]) / 2
    torch.testing.assert_close(st_f["unif"], in_modal + st_f["unif_cross"])


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 1000])  # divides B or not (B in 2, 5, 13)
def test_siglip_chunked_equals_full(b, d, chunk):
    x = make(b, d)
    obj = get_objective("siglip", chunk=chunk)
    compare(
        lambda: obj(x["img"], x["txt"], x["scale"], x["bias"])[0],
        lambda: naive_siglip(x["img"], x["txt"], x["scale"], x["bias"]),
        x,
        ("img", "txt", "scale", "bias"),
    )


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("chunk", [2, 1000])
def test_filip(b, d, chunk):
    x = make(b, d)
    obj = get_objective("filip", chunk=chunk)
    compare(
        lambda: obj(
            x["img"],
            x["txt"],
            x["scale"],
            None,
            img_tokens=x["img_tokens"],
            txt_tokens=x["txt_tokens"],
            txt_mask=x["txt_mask"],
        )[0],
        lambda: naive_filip(x["img_tokens"], x["txt_tokens"], x["txt_mask"], x["scale"]),
        x,
        ("img_tokens", "txt_tokens", "scale"),
    )


def test_filip_ignores_padding_values():
    """Changing the features at padded text positions changes nothing (they are masked, not zero-weighted)."""
    x = make(5, 8)
    obj = get_objective("filip")
    kw = dict(img_tokens=x["img_tokens"], txt_mask=x["txt_mask"])
    a = obj(x["img"], x["txt"], x["scale"], None, txt_tokens=x["txt_tokens"], **kw)[0]
    noisy = torch.where(x["txt_mask"][..., None], x["txt_tokens"], torch.ones_like(x["txt_tokens"]) * 5.0)
    assert not torch.equal(noisy, x["txt_tokens"])
    b = obj(x["img"], x["txt"], x["scale"], None, txt_tokens=noisy, **kw)[0]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("hard_images", [0, 1, 2])  # 1: hard images, 3B texts; 2: NegCLIP's 4B texts
def test_negclip(b, d, chunk, hard_images):
    x = make(b, d)
    obj = get_objective("negclip", chunk=chunk)
    extra = {"hard_txt": x["hard_txt"]}
    wrt = ["img", "txt", "hard_txt", "scale"]
    if hard_images:
        extra.update(hard_img=x["hard_img"], hard_img_txt=x["hard_img_txt"])
        wrt += ["hard_img", "hard_img_txt"]
    if hard_images == 2:
        extra.update(hard_img_hard_txt=x["hard_img_hard_txt"])
        wrt += ["hard_img_hard_txt"]
    compare(
        lambda: obj(x["img"], x["txt"], x["scale"], None, **extra)[0],
        lambda: naive_negclip(
            x["img"],
            x["txt"],
            x["hard_txt"],
            x["scale"],
            extra.get("hard_img"),
            extra.get("hard_img_txt"),
            extra.get("hard_img_hard_txt"),
        ),
        x,
        wrt,
    )


@pytest.mark.parametrize("b", [1, 2, 5])
@pytest.mark.parametrize("chunk", [2, 1000])
def test_negclip_full_batch_fp32(b, chunk):
    """NegCLIP's whole batch (2B images, 4B texts) in float32, batch sizes from 1."""
    x = fp32(make(b, 6))
    keys = ("hard_txt", "hard_img", "hard_img_txt", "hard_img_hard_txt")
    obj = get_objective("negclip", chunk=chunk)
    compare_fp32(
        lambda: obj(x["img"], x["txt"], x["scale"], None, **{k: x[k] for k in keys})[0],
        lambda: naive_negclip(x["img"], x["txt"], x["hard_txt"], x["scale"], *(x[k] for k in keys[1:])),
        x,
        ("img", "txt", "scale", *keys),
    )
    with pytest.raises(ValueError, match="hard_img_hard_txt is the hard image's hard caption"):
        obj(x["img"], x["txt"], x["scale"], None, hard_txt=x["hard_txt"], hard_img_hard_txt=x["hard_txt"])
    assert obj.hard_images and not get_objective("negclip", hard_images=False).hard_images


def test_negclip_hard_caption_raises_loss_over_clip():
    """A hard caption is one more competitor in each image's softmax: the i2t part can only grow."""
    x = make(6, 8)
    clip = get_objective("clip")(x["img"], x["txt"], x["scale"], None)[1]
    neg = get_objective("negclip")(x["img"], x["txt"], x["scale"], None, hard_txt=x["hard_txt"])[1]
    assert neg["loss_i2t"] > clip["loss_i2t"]
    assert neg["loss_t2i"] == pytest.approx(clip["loss_t2i"])


@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("cross", [True, False])
@pytest.mark.parametrize("mix", ["fahim", "mean"])
def test_unif_align(b, d, cross, mix):
    x = make(b, d)
    obj = get_objective("unif_align", chunk=3, w_align=0.7, w_unif=1.3, cross_uniformity=cross, unif_mix=mix)
    compare(
        lambda: obj(x["img"], x["txt"], x["scale"], None)[0],
        lambda: naive_unif_align(x["img"], x["txt"], x["scale"], 0.7, 1.3, cross, mix),
        x,
        ("img", "txt", "scale"),
    )


def test_stats_report_retrieval_accuracy():
    """Perfectly matched pairs (txt = img) are retrieved: accuracies 1; a shuffled text side drops them."""
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(16, 32, generator=g, dtype=torch.float64), dim=-1)
    s = torch.tensor(10.0, dtype=torch.float64)
    for name in ("clip", "dcl", "negclip", "unif_align"):
        extra = {"hard_txt": -img} if name == "negclip" else {}
        for chunk in (5, 1000):
            st = get_objective(name, chunk=chunk)(img, img, s, None, **extra)[1]
            assert st["acc_i2t"] == 1.0 and st["acc_t2i"] == 1.0, (name, chunk, st)
            st = get_objective(name, chunk=chunk)(img, img.roll(1, 0), s, None, **extra)[1]
            assert st["acc_i2t"] == 0.0, (name, chunk, st)
    st = get_objective("siglip", chunk=5)(img, img, s, torch.tensor(-5.0, dtype=torch.float64))[1]
    assert st["acc_i2t"] == 1.0


def caption_method_extras(obj, b: int, d: int, dtype: torch.dtype) -> dict:
    """The extras of encoders.objectives_text's objectives (tested in full in tests/test_caption_methods.py):
    DreamLIP's 2 sub-captions per image, ALIP's synthetic captions and fresh running means, FDT's codebook."""
    g = torch.Generator().manual_seed(5)
    out = {}
    if "sub_txt" in obj.needs:
        out["sub_txt"] = unit(2 * b, d, g=g).detach().to(dtype)
    if "syn_txt" in obj.needs:
        out["syn_txt"] = unit(b, d, g=g).detach().to(dtype)
        out.update(
            alip_means=torch.zeros(3, dtype=torch.float64), alip_started=torch.zeros(1, dtype=torch.float64)
        )
    if "codebook" in obj.needs:
        out["codebook"] = torch.randn(obj.codebook_size, d, generator=g).to(dtype)
    return out


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_bf16_features_close_to_fp32(name):
    """bf16 features: logits, dot products and token similarities are accumulated in fp32, so the loss is a
    float32 number close to the fp32 features' loss (chunked path: 64 rows, chunk 16)."""
    x = make(64, 32)
    obj = get_objective(name, chunk=16)
    bias = torch.tensor(-3.0) if obj.uses_bias else None
    keys = [k for k in ("img_tokens", "txt_tokens", "hard_txt") if k in obj.needs]

    def run(dtype):
        extra = {k: x[k].detach().to(dtype) for k in keys}
        if "txt_mask" in obj.needs:
            extra["txt_mask"] = x["txt_mask"]
        extra.update(caption_method_extras(obj, 64, 32, dtype))
        return obj(
            x["img"].detach().to(dtype), x["txt"].detach().to(dtype), torch.tensor(10.0), bias, **extra
        )[0]

    ref, got = run(torch.float32), run(torch.bfloat16)
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) < 0.02 * abs(ref.item()) + 0.02, (got, ref)


@pytest.mark.parametrize("exclude,cols", [(None, True), (0, True), (2, False), (-3, False)])
def test_chunked_kernels_gradcheck(exclude, cols):
    """The hand-written backward passes of the chunked kernels against finite differences, with arbitrary
    upstream weights on every row and column log-sum-exp (not just the objectives' uniform means)."""
    from encoders.chunked import pair_lse, siglip_sum

    g = torch.Generator().manual_seed(3)
    x, y = unit(7, 5, g=g), unit(9, 5, g=g)
    if cols:
        y = unit(7, 5, g=g)
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    w_row, w_col = (
        torch.randn(7, generator=g, dtype=torch.float64),
        torch.randn(y.shape[0], generator=g, dtype=torch.float64),
    )

    def f(x, y, s):
        r = pair_lse(x, y, s, chunk=3, exclude_offset=exclude, cols=cols)
        return (r.row * w_row).sum() + ((r.col * w_col).sum() if cols else 0.0)

    assert torch.autograd.gradcheck(f, (x, y, s))
    off = exclude or 0
    assert torch.autograd.gradcheck(
        lambda x, y, s, b: siglip_sum(x, y, s, b, chunk=2, pos_offset=off)[0], (x, y, s, b)
    )


# ---------------------------------------------------------------- distributed: 2 gloo ranks vs one process
def test_distributed_equals_single_process(tmp_path):
    """Each rank holds half the batch; mean of the ranks' losses = the naive loss on the whole batch; each
    rank's gradient wrt its local features = world x the whole-batch gradient's slice (the sum over ranks'
    losses, which DDP's averaging of parameter gradients turns into the mean); scale/bias gradients
    averaged over ranks = the whole-batch ones. All objectives in one spawn."""
    from mllm.training.distributed import free_port

    w = dist_worker

    world = 2
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "_dist_objectives_worker.py"), str(tmp_path)],
            env=subprocess_env(REPO, RANK=str(r), LOCAL_RANK=str(r), **env),
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
    leaf = {k: v.clone().requires_grad_() if v.is_floating_point() else v for k, v in full.items()}
    refs = {
        "clip": lambda x: naive_infonce(x["img"], x["txt"], x["scale"]),
        "siglip": lambda x: naive_siglip(x["img"], x["txt"], x["scale"], x["bias"]),
        "dcl": lambda x: naive_infonce(x["img"], x["txt"], x["scale"], exclude_positive=True),
        "dcl_paper": lambda x: naive_dcl_paper(x["img"], x["txt"], x["scale"]),
        "filip": lambda x: naive_filip(x["img_tokens"], x["txt_tokens"], x["txt_mask"], x["scale"]),
        "negclip": lambda x: naive_negclip(x["img"], x["txt"], x["hard_txt"], x["scale"]),
        "negclip_hard_img": lambda x: naive_negclip(
            x["img"], x["txt"], x["hard_txt"], x["scale"], x["hard_img"], x["hard_img_txt"]
        ),
        "negclip_4b": lambda x: naive_negclip(
            x["img"],
            x["txt"],
            x["hard_txt"],
            x["scale"],
            x["hard_img"],
            x["hard_img_txt"],
            x["hard_img_hard_txt"],
        ),
        "unif_align": lambda x: naive_unif_align(x["img"], x["txt"], x["scale"], 0.7, 1.3),
        "unif_align_mean": lambda x: naive_unif_align(x["img"], x["txt"], x["scale"], 0.7, 1.3, mix="mean"),
    }
    assert set(refs) == set(w.CASES)
    b = w.LOCAL_B
    for case, (_, _, extras) in w.CASES.items():
        names = [
            k for k in ("img", "txt", *extras) if k != "txt_mask" and not (case == "filip" and k in "img txt")
        ]
        assert all(f"{case}.grad.{k}" in ranks[0] for k in names), (case, sorted(ranks[0]))
        uses_bias = f"{case}.grad.bias" in ranks[0]
        ref = refs[case](leaf)
        params = ["scale", "bias"] if uses_bias else ["scale"]
        grads = dict(zip(names + params, torch.autograd.grad(ref, [leaf[k] for k in names + params])))
        mean_loss = sum(rk[f"{case}.loss"] for rk in ranks) / world
        torch.testing.assert_close(mean_loss[0], ref.detach(), rtol=1e-10, atol=1e-10, msg=f"{case} loss")
        for r, rk in enumerate(ranks):
            for k in names:
                where = f"{case} rank {r} grad {k}"
                torch.testing.assert_close(
                    rk[f"{case}.grad.{k}"] / world,
                    grads[k][r * b : (r + 1) * b],
                    rtol=1e-9,
                    atol=1e-12,
                    msg=lambda m, where=where: f"{where}: {m}",
                )
        for k in params:
            mean_g = sum(rk[f"{case}.grad.{k}"] for rk in ranks) / world
            torch.testing.assert_close(mean_g[0], grads[k], rtol=1e-9, atol=1e-12, msg=f"{case} grad {k}")
    for r in range(world):
        msg = json.loads((tmp_path / f"rank{r}.json").read_text())["ragged_error"]
        assert "different batch sizes [4, 5]" in msg, msg


# ---------------------------------------------------------------- registry, logit init, bad input
def test_registry_and_logit_init():
    assert set(OBJECTIVES) >= {"clip", "siglip", "filip", "dcl", "negclip", "unif_align"}
    clip = init_logit_params("clip")
    assert clip.log_scale == pytest.approx(math.log(1 / 0.07)) and clip.bias is None and clip.max_scale == 100
    assert clip.scale_from_log(torch.tensor(10.0)).item() == pytest.approx(100.0)
    sig = init_logit_params("siglip")
    assert sig.log_scale == pytest.approx(math.log(10)) and sig.bias == -10
    assert get_objective("filip").needs == ("img_tokens", "txt_tokens", "txt_mask")
    assert get_objective("negclip").needs == ("hard_txt",)
    assert get_objective("siglip", chunk=7).chunk == 7
    with pytest.raises(ValueError, match="unknown contrastive objective 'clipp'"):
        get_objective("clipp")
    with pytest.raises(ValueError, match=r"unknown config keys \['chunks'\]"):
        get_objective("clip", chunks=3)
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        get_objective("siglip", chunk=0)
    with pytest.raises(ValueError, match="already registered"):
        register_objective("clip")(type(OBJECTIVES["clip"]))
    with pytest.raises(ValueError, match="unknown contrastive objective"):
        init_logit_params("nope")


def test_bad_input_errors():
    x = make(4, 8)
    img, txt, s = x["img"], x["txt"], x["scale"]
    clip = get_objective("clip")
    with pytest.raises(ValueError, match=r"'clip'.*img \(4, 8\) and txt \(3, 8\)"):
        clip(img, txt[:3], s)
    with pytest.raises(ValueError, match=r"img must be a float tensor \[B, D\], got \(32,\)"):
        clip(img.flatten(), txt.flatten(), s)
    with pytest.raises(ValueError, match="takes no bias"):
        clip(img, txt, s, x["bias"])
    with pytest.raises(ValueError, match="scale must hold one number"):
        clip(img, txt, torch.ones(2))
    with pytest.raises(ValueError, match=r"unknown extra inputs \['hard_text'\]"):
        clip(img, txt, s, hard_text=x["hard_txt"])
    with pytest.raises(ValueError, match="'siglip': needs a 1-element bias"):
        get_objective("siglip")(img, txt, s, None)
    filip = get_objective("filip")
    with pytest.raises(ValueError, match=r"'filip': missing extra inputs \['txt_tokens', 'txt_mask'\]"):
        filip(img, txt, s, img_tokens=x["img_tokens"])
    with pytest.raises(ValueError, match=r"img_tokens must be \[B=4, N, D=8\], got \(4, 3, 7\)"):
        filip(
            img,
            txt,
            s,
            img_tokens=x["img_tokens"][..., :7],
            txt_tokens=x["txt_tokens"],
            txt_mask=x["txt_mask"],
        )
    with pytest.raises(ValueError, match="txt_mask must be a bool tensor"):
        filip(
            img,
            txt,
            s,
            img_tokens=x["img_tokens"],
            txt_tokens=x["txt_tokens"],
            txt_mask=x["txt_mask"].float(),
        )
    empty = x["txt_mask"].clone()
    empty[2] = False
    with pytest.raises(ValueError, match=r"no real token in rows \[2\]"):
        filip(img, txt, s, img_tokens=x["img_tokens"], txt_tokens=x["txt_tokens"], txt_mask=empty)
    neg = get_objective("negclip")
    with pytest.raises(ValueError, match=r"'negclip': missing extra inputs \['hard_txt'\]"):
        neg(img, txt, s)
    with pytest.raises(ValueError, match=r"hard_txt must be a tensor of img's shape \(4, 8\), got \(3, 8\)"):
        neg(img, txt, s, hard_txt=x["hard_txt"][:3])
    with pytest.raises(ValueError, match="come together"):
        neg(img, txt, s, hard_txt=x["hard_txt"], hard_img=x["hard_img"])
    for name in ("dcl", "unif_align"):
        with pytest.raises(ValueError, match="at least 2 pairs"):
            get_objective(name)(img[:1], txt[:1], s)


# ---------------------------------------------------------------- CLIP's logit-scale cap (open_clip's rule)
@pytest.mark.parametrize("b", [1, 4, 7])
def test_logit_scale_clamped_after_the_step_as_open_clip(b):
    """open_clip: forward with exp(logit_scale), optimiser step, then logit_scale.clamp_(0, ln 100). Ours:
    forward with scale_from_log (a log-space guard), step, then clamp_log_scale_. A large learning rate
    throws the parameter past both bounds; both trajectories agree, the gradient at a bound is the
    ordinary one (not 0), and a parameter left outside the range is brought back into it."""
    init = init_logit_params("clip")
    x = fp32(make(b, 6))
    img, txt = x["img"].detach(), x["txt"].detach()
    txt = F.normalize(img + txt, dim=-1)
    ours = torch.nn.Parameter(torch.tensor([3.5]))
    ref = torch.nn.Parameter(torch.tensor([3.5]))
    opt_o, opt_r = torch.optim.SGD([ours], lr=50.0), torch.optim.SGD([ref], lr=50.0)
    obj = get_objective("clip")
    seen = set()
    for _ in range(4):
        loss_o = obj(img, txt, init.scale_from_log(ours), None)[0]
        loss_r = naive_infonce(img, txt, ref.exp().reshape(()))
        opt_o.zero_grad(), opt_r.zero_grad()
        loss_o.backward(), loss_r.backward()
        if b > 1:  # B = 1: the loss is 0 whatever the scale
            assert ours.grad.abs().item() > 1e-3
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-6)
        opt_o.step(), opt_r.step()
        init.clamp_log_scale_(ours)
        with torch.no_grad():
            ref.clamp_(0, math.log(100))
        # the gradients agree to rtol 1e-4 (the fused objective and the naive formula sum in different
        # orders, and CPUs differ in how), and lr 50 carries that into the parameter: compare it at the
        # tolerance the gradient check grants, times the step (measured: 4.9e-5 apart on an Intel Xeon
        # with AMX, where float32's default 1e-5 failed; the bounds it checks are whole units apart)
        torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-4, atol=50 * 1e-5)
        seen.add(round(ours.item(), 4))
    if b > 1:
        assert {0.0, round(math.log(100), 4)} <= seen  # it hit both bounds and left each again
    for start, want in ((6.0, math.log(100)), (-2.0, 0.0)):
        out = torch.nn.Parameter(torch.tensor([start]))
        init.clamp_log_scale_(out)
        assert out.item() == pytest.approx(want) and out.requires_grad
    sig = init_logit_params("siglip")  # no bounds: the clamp does nothing
    free = torch.tensor([6.0])
    sig.clamp_log_scale_(free)
    assert free.item() == 6.0 and sig.scale_from_log(free).item() == pytest.approx(math.exp(6.0))
