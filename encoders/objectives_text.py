"""Contrastive objectives of the caption-centred methods: CLIP++'s label smoothing, FDT's finite discrete
tokens, DreamLIP's sub-caption losses and ALIP's consistency gates (entries of `encoders.objectives.OBJECTIVES`, registered when `encoders` is imported).

The data-side parts of these methods (ALIGN's noisy captions, LaCLIP's rewrites, CLIP++'s text masking
and image augmentation, DreamLIP's sub-captions) are in `mllm.data.geoworld.rewrites` and
`mllm.data.caption_aug`; ALIGN and LaCLIP train with the plain `clip` objective.

Interface, distributed form (gather with gradient, local rows against global columns) and statistics as
in `encoders.objectives`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from encoders.chunked import acc_dtype
from encoders.gather import all_reduce_sum, dist_info, gather_with_grad
from encoders.objectives import ContrastiveObjective, _accuracy, _positive_logits, _stat, register_objective
from encoders.objectives_extra import _both_directions, _check_count, _check_number

__all__ = [
    "ClipPlusPlusObjective",
    "FdtCodebook",
    "FdtObjective",
    "FDT_NORMALIZERS",
    "AlipObjective",
    "AlipState",
    "alip_gate",
    "fdt_embed",
    "sparsemax",
]


@register_objective("clippp")
@dataclass
class ClipPlusPlusObjective(ContrastiveObjective):
    """CLIP++ (Fini et al. 2023, "Improved baselines for vision-language pre-training"): CLIP's symmetric
    InfoNCE with label smoothing ε in both cross entropies: target q = (1-ε) one-hot + ε/K over the K
    (global) candidates, i.e. l_i = lse_j(z_ij) - (1-ε) z_ii - (ε/K) sum_j z_ij, z = s x.y.

    label_smoothing: ε in [0, 1) (the paper's 0.1; 0 is CLIP). The recipe's other switches are data
    options: `data.image_augment`, `data.text_mask` (mllm.data.caption_aug). Memory O(B * chunk) as CLIP:
    the smoothing term needs only each row's dot product with the sum of the columns.
    """

    chunk: int = 1024
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number(self, "label_smoothing", self.label_smoothing, 0.0, 1.0, hi_open=True)

    def compute(self, img, txt, scale, bias, **extra):
        lse_i2t, lse_t2i, arg_i2t, arg_t2i, txt_all, img_all, off = _both_directions(
            img, txt, scale, self.chunk
        )
        acc = acc_dtype(img)
        s = scale.to(acc).reshape(())
        pos = _positive_logits(img, txt, scale)
        eps = float(self.label_smoothing)
        # mean over the K columns of row i's logits: s * x_i . mean_j y_j
        mean_i2t = s * (img.to(acc) @ txt_all.to(acc).mean(0))
        mean_t2i = s * (txt.to(acc) @ img_all.to(acc).mean(0))
        l_i2t = (lse_i2t - (1 - eps) * pos - eps * mean_i2t).mean()
        l_t2i = (lse_t2i - (1 - eps) * pos - eps * mean_t2i).mean()
        labels = torch.arange(off, off + img.shape[0], device=img.device)
        return (l_i2t + l_t2i) / 2, {
            "loss_i2t": l_i2t.detach(),
            "loss_t2i": l_t2i.detach(),
            "scale": _stat(scale),
            "acc_i2t": _accuracy(arg_i2t, labels),
            "acc_t2i": _accuracy(arg_t2i, labels),
        }


def sparsemax(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparsemax (Martins & Astudillo 2016): the Euclidean projection of z onto the simplex,
    p = max(z - τ, 0) with τ such that sum p = 1. Autograd through the sort gives its Jacobian
    diag(s) - s sᵀ/|S| (s: the support)."""
    z = z.transpose(dim, -1)
    zs, _ = torch.sort(z, dim=-1, descending=True)
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    cum = zs.cumsum(-1)
    support = (1 + k * zs > cum).to(z.dtype)
    n = support.sum(-1, keepdim=True)  # |S| >= 1 (the largest entry is always in it)
    tau = (cum.gather(-1, n.long() - 1) - 1) / n
    return torch.clamp(z - tau, min=0).transpose(dim, -1)


#: How FDT turns relevance scores into weights over the codebook (FdtObjective.normalizer).
FDT_NORMALIZERS = ("sparsemax", "softmax")


def fdt_embed(
    tokens: torch.Tensor, mask: torch.Tensor | None, codebook: torch.Tensor, normalizer: str
) -> torch.Tensor:
    """FDT embedding [B, D] of tokens [B, T, D] (mask [B, T] bool, True = real; None: all real):
    relevance r_k = max over real tokens t of <tokens_t, c_k>, weights w = normalizer(r) over the K
    codes, embedding = sum_k w_k c_k, L2-normalised."""
    acc = acc_dtype(tokens)
    sim = torch.einsum("btd,kd->btk", tokens.to(acc), codebook.to(acc))
    if mask is not None:
        sim = sim.masked_fill(~mask[:, :, None], float("-inf"))
    r = sim.max(1).values  # [B, K]
    w = sparsemax(r) if normalizer == "sparsemax" else torch.softmax(r, -1)
    return torch.nn.functional.normalize(w @ codebook.to(acc), dim=-1)


class FdtCodebook(nn.Module):
    """FDT's learnable codebook [K, D], kept in the model's heads (trained and saved with them)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(size, dim) / math.sqrt(dim))

    def extras(self) -> dict[str, torch.Tensor]:
        return {"codebook": self.codebook}


@register_objective("fdt")
@dataclass
class FdtObjective(ContrastiveObjective):
    """FDT (Chen et al. 2023, "Revisiting Multimodal Representation in Contrastive Learning: From Patch
    and Token Embeddings to Finite Discrete Tokens"): a codebook C [K, D] shared by both modalities; each
    side's patch / token embeddings ground to it by max-pooled similarity r_k = max_t <f_t, c_k>, a
    sparse weight vector w = sparsemax(r) (the paper's sparse activation constraint; `softmax` its dense
    ablation), the embedding sum_k w_k c_k (L2-normalised); then CLIP's symmetric InfoNCE on them.

    codebook_size: K (>= 1); the codebook dim is the model's embed_dim. The codebook is a parameter of
    the model (`make_state`, in its heads); the model's global embeddings (and retrieval) are the FDT
    embeddings (`embed_tokens`). Extras: img_tokens [B, N, D], txt_tokens [B, L, D], txt_mask [B, L]
    (as FILIP), codebook [K, D]. The global img/txt inputs are checked but not used.
    """

    chunk: int = 1024
    codebook_size: int = 256
    normalizer: str = "sparsemax"
    needs: ClassVar[tuple[str, ...]] = ("img_tokens", "txt_tokens", "txt_mask", "codebook")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_count(self, "codebook_size", self.codebook_size, 1)
        if self.normalizer not in FDT_NORMALIZERS:
            raise self._err(f"normalizer must be one of {FDT_NORMALIZERS}, got {self.normalizer!r}")

    def make_state(self, embed_dim: int) -> FdtCodebook:
        """The learnable codebook the model keeps for this objective."""
        return FdtCodebook(self.codebook_size, embed_dim)

    def embed_tokens(self, tokens: torch.Tensor, mask: torch.Tensor | None, **state: Any) -> torch.Tensor:
        """The FDT embedding the model uses as its global embedding (training and retrieval)."""
        return fdt_embed(tokens, mask, state["codebook"], self.normalizer)

    def _check_extra(self, img, extra):
        b, d = img.shape
        cb = extra["codebook"]
        if not isinstance(cb, torch.Tensor) or cb.dim() != 2 or cb.shape != (self.codebook_size, d):
            raise self._err(
                f"codebook must be [codebook_size={self.codebook_size}, D={d}], got "
                f"{tuple(getattr(cb, 'shape', ()))}"
            )
        for key in ("img_tokens", "txt_tokens"):
            t = extra[key]
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] != b or t.shape[2] != d:
                raise self._err(f"{key} must be [B={b}, T, D={d}], got {tuple(getattr(t, 'shape', ()))}")
        tm = extra["txt_mask"]
        if (
            not isinstance(tm, torch.Tensor)
            or tm.dtype != torch.bool
            or tm.shape != extra["txt_tokens"].shape[:2]
        ):
            raise self._err("txt_mask must be a bool tensor [B, L] matching txt_tokens")
        if not bool(tm.any(1).all()):
            raise self._err("txt_mask has a row without a real token (every caption needs one)")

    def compute(self, img, txt, scale, bias, **extra):
        cb = extra["codebook"]
        img_f = fdt_embed(extra["img_tokens"], None, cb, self.normalizer)
        txt_f = fdt_embed(extra["txt_tokens"], extra["txt_mask"], cb, self.normalizer)
        return self._infonce(img_f, txt_f, scale, chunk=self.chunk, exclude_positive=False)


def group_patches(queries: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """DreamLIP's (SPARC-style) grouping: for each query q_k [K, D] of an image with patches [N, D], the
    alignment a_n = <q_k, p_n>, min-max normalised over the patches, entries below 1/N set to 0, the rest
    renormalised to weights w_n; the grouped embedding normalise(sum_n w_n p_n). queries [B, K, D], patches
    [B, N, D] -> [B, K, D]. Gradients pass through the weights (as in SPARC)."""
    acc = acc_dtype(patches)
    q, p = queries.to(acc), patches.to(acc)
    a = torch.einsum("bkd,bnd->bkn", q, p)
    lo, hi = a.min(-1, keepdim=True).values, a.max(-1, keepdim=True).values
    flat = hi <= lo  # all patches equally aligned (one patch, or a constant row): uniform weights
    a = torch.where(flat, torch.ones_like(a), (a - lo) / torch.where(flat, torch.ones_like(hi), hi - lo))
    a = torch.where(a >= 1.0 / p.shape[1], a, torch.zeros_like(a))  # the largest entry (1) always stays
    w = a / a.sum(-1, keepdim=True)
    return torch.nn.functional.normalize(torch.einsum("bkn,bnd->bkd", w, p), dim=-1)


@register_objective("dreamlip")
@dataclass
class DreamLipObjective(ContrastiveObjective):
    """DreamLIP (Zheng et al. 2024, "DreamLIP: Language-Image Pre-training with Long Captions"): each image
    comes with K sub-captions (sentences of its long caption) as extra positives. L = L_clip(x, y) +
    w_sub L_sub + w_group L_group, with s the learnable scale and u_ik the K sub-caption embeddings of image i:

    - L_sub (multiple positives): image->sub-captions -(1/K) sum_k log(e^{s x_i.u_ik} / sum_{j,k'} e^{s
      x_i.u_jk'}) (every sub-caption of the global batch a candidate, the image's own K the positives,
      their log-probabilities averaged), and sub-caption->images -log(e^{s u_ik.x_i} / sum_j e^{s u_ik.x_j});
      the two directions averaged.
    - L_group (sub-caption-specific grouping): g_ik = `group_patches`(u_ik, image i's patch tokens), and
      InfoNCE within the image between the grouped embeddings and the sub-captions, both directions:
      -log(e^{s g_ik.u_ik} / sum_k' e^{s g_ik.u_ik'}) and -log(e^{s u_ik.g_ik} / sum_k' e^{s u_ik.g_ik'}).
      A sentence must pick out its own region of the image, not just any region of it.

    Which forms: the paper's summary states the losses in words; these are the multi-positive InfoNCE of
    the paper's figure and SPARC's grouping (min-max, 1/N threshold) with the sub-caption embedding as the
    query, which is what the paper builds on. y is the row's caption (data.caption); the sub-captions are
    data.sub_captions = K > 0. Extras: sub_txt [B*K, D] (sample-major), img_tokens [B, N, D]. chunk: the
    CLIP term's rows per block; L_sub and L_group are full matrices, O(B * world*B*K) and O(B * K * N).
    """

    chunk: int = 1024
    w_sub: float = 1.0
    w_group: float = 1.0
    needs: ClassVar[tuple[str, ...]] = ("sub_txt", "img_tokens")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number(self, "w_sub", self.w_sub, 0.0, math.inf, hi_open=True)
        _check_number(self, "w_group", self.w_group, 0.0, math.inf, hi_open=True)

    def _check_extra(self, img, extra):
        b, d = img.shape
        sub, it = extra["sub_txt"], extra["img_tokens"]
        if not isinstance(sub, torch.Tensor) or sub.dim() != 2 or sub.shape[1] != d or sub.shape[0] % b:
            raise self._err(
                f"sub_txt must be [B*K, D={d}] with B={b}, got {tuple(getattr(sub, 'shape', ()))}"
            )
        if sub.shape[0] == 0:
            raise self._err("sub_txt is empty: set data.sub_captions to K > 0")
        if not isinstance(it, torch.Tensor) or it.dim() != 3 or it.shape[0] != b or it.shape[2] != d:
            raise self._err(f"img_tokens must be [B={b}, N, D={d}], got {tuple(getattr(it, 'shape', ()))}")

    def compute(self, img, txt, scale, bias, **extra):
        clip, stats = self._infonce(img, txt, scale, chunk=self.chunk, exclude_positive=False)
        acc = acc_dtype(img)
        s = scale.to(acc).reshape(())
        rank, _ = dist_info()
        b = img.shape[0]
        sub = extra["sub_txt"]
        k = sub.shape[0] // b
        off = rank * b
        sub_all = gather_with_grad(sub, "sub_txt").to(acc)
        img_all = gather_with_grad(img, "img").to(acc)
        x, u = img.to(acc), sub.to(acc)
        # image -> every sub-caption of the global batch; its own K (columns (off + i) * K + k) positive
        logp_i2s = torch.log_softmax(s * x @ sub_all.T, 1)  # [B, world*B*K]
        own = (off + torch.arange(b, device=img.device))[:, None] * k + torch.arange(k, device=img.device)
        l_i2s = -logp_i2s.gather(1, own).mean()
        # sub-caption -> images; positive its image (off + i)
        logp_s2i = torch.log_softmax(s * u @ img_all.T, 1)  # [B*K, world*B]
        pos_img = (off + torch.arange(b, device=img.device)).repeat_interleave(k)
        l_s2i = -logp_s2i.gather(1, pos_img[:, None]).mean()
        l_sub = (l_i2s + l_s2i) / 2
        # grouping: within each image, grouped patches vs its sub-captions
        uk = u.reshape(b, k, -1)
        g = group_patches(uk, extra["img_tokens"])
        logits = s * torch.einsum("bkd,bld->bkl", g, uk)  # [B, K(grouped), K(sub-caption)]
        eye = torch.arange(k, device=img.device)
        l_g2s = -torch.log_softmax(logits, 2)[:, eye, eye].mean()
        l_s2g = -torch.log_softmax(logits, 1)[:, eye, eye].mean()
        l_group = (l_g2s + l_s2g) / 2
        loss = clip + self.w_sub * l_sub + self.w_group * l_group
        stats.update(loss_clip=clip.detach(), loss_sub=l_sub.detach(), loss_group=l_group.detach())
        return loss, stats


def alip_gate(sim: torch.Tensor, mean: torch.Tensor, gamma: float) -> torch.Tensor:
    """ALIP's gate on a consistency score: 1 at or above the running mean, exp(-gamma (mean - sim)) below."""
    return torch.exp(-gamma * (mean - sim).clamp_min(0))


class AlipState(nn.Module):
    """ALIP's running means of the three consistency scores (text-caption, image-text, image-caption) and
    whether they have been started; buffers, saved with the heads."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("means", torch.zeros(3, dtype=torch.float64))
        self.register_buffer("started", torch.zeros(1, dtype=torch.float64))

    def extras(self) -> dict[str, torch.Tensor]:
        return {"alip_means": self.means, "alip_started": self.started}


@register_objective("alip")
@dataclass
class AlipObjective(ContrastiveObjective):
    """ALIP (Yang et al. 2023, "Adaptive Language-Image Pre-training with Synthetic Caption"): a bi-path
    CLIP over (image x, raw text t) and (image x, synthetic caption c), re-weighted per sample by two gates:

    - Language Consistency Gate (sample weight): w_s = g(<t_i, c_i>, μ_tc): a raw text that disagrees with
      the synthetic caption of the same image is likely noise, so the whole sample weighs less;
    - Description Consistency Gate (pair weights): w_t = g(<x_i, t_i>, μ_it), w_c = g(<x_i, c_i>, μ_ic);
    - L = mean_i [w_s,i w_t,i l_it(i) + w_c,i l_ic(i)], l_it(i) = (CE_i(x->t) + CE_i(t->x)) / 2 the
      per-sample symmetric InfoNCE terms of the raw path, l_ic(i) the same on the caption path.

    g(s, μ) = min(1, exp(gamma (s - μ))), with μ the running mean of the score (EMA over steps, momentum
    `momentum`, started at the first batch's mean; the gates of a step use the means before its update,
    which uses the global batch). The abstract states the gates' role, not their formula; this is the form
    implemented (weights in (0, 1], 1 for a sample at least as consistent as usual, lower below; no
    gradient through the weights, as sample weights are not optimised). The running means live in the
    model (`make_state`, buffers in its heads). Extras: syn_txt [B, D] (the synthetic caption embeddings,
    GeoWorld's `synthetic` field), alip_means [3], alip_started [1].
    """

    chunk: int = 1024
    gamma: float = 5.0
    momentum: float = 0.99
    needs: ClassVar[tuple[str, ...]] = ("syn_txt", "alip_means", "alip_started")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number(self, "gamma", self.gamma, 0.0, math.inf, hi_open=True)
        _check_number(self, "momentum", self.momentum, 0.0, 1.0, hi_open=True)

    def make_state(self, embed_dim: int) -> AlipState:
        return AlipState()

    def _check_extra(self, img, extra):
        self._check_rows(img, extra, "syn_txt")
        m, st = extra["alip_means"], extra["alip_started"]
        if (
            not isinstance(m, torch.Tensor)
            or m.shape != (3,)
            or not isinstance(st, torch.Tensor)
            or st.numel() != 1
        ):
            raise self._err("alip_means must be a tensor [3] and alip_started a 1-element tensor")

    def _path(self, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor):
        """Per local row: the symmetric InfoNCE term of pairs (a_i, b_i), and the arg-max columns."""
        lse_ab, lse_ba, arg_ab, arg_ba, _, _, _ = _both_directions(a, b, scale, self.chunk)
        pos = _positive_logits(a, b, scale)
        return ((lse_ab - pos) + (lse_ba - pos)) / 2, arg_ab, arg_ba

    def compute(self, img, txt, scale, bias, **extra):
        syn, means, started = extra["syn_txt"], extra["alip_means"], extra["alip_started"]
        acc = acc_dtype(img)
        x, t, c = img.to(acc), txt.to(acc), syn.to(acc)
        with torch.no_grad():
            scores = torch.stack([(t * c).sum(-1), (x * t).sum(-1), (x * c).sum(-1)])  # [3, B]
            _, world = dist_info()
            batch_means = all_reduce_sum(scores.sum(1).to(means.dtype)) / (scores.shape[1] * world)
            mu = torch.where(started.reshape(()) > 0, means, batch_means).to(acc)
            w_s, w_t, w_c = (alip_gate(scores[k], mu[k], self.gamma) for k in range(3))
            # the running means move after the gates are taken (in place: a model buffer)
            new = torch.where(
                started.reshape(()) > 0,
                self.momentum * means + (1 - self.momentum) * batch_means,
                batch_means,
            )
            means.copy_(new)
            started.fill_(1.0)
        l_it, arg_i2t, arg_t2i = self._path(img, txt, scale)
        l_ic, _, _ = self._path(img, syn, scale)
        loss = (w_s * w_t * l_it + w_c * l_ic).mean()
        rank, _ = dist_info()
        off = rank * img.shape[0]
        labels = torch.arange(off, off + img.shape[0], device=img.device)
        return loss, {
            "loss_raw": l_it.mean().detach(),
            "loss_caption": l_ic.mean().detach(),
            "gate_language": w_s.mean(),
            "gate_text": w_t.mean(),
            "gate_caption": w_c.mean(),
            "scale": _stat(scale),
            "acc_i2t": _accuracy(arg_i2t, labels),
            "acc_t2i": _accuracy(arg_t2i, labels),
        }
