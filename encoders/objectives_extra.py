"""More entries of the contrastive objective registry (`encoders.objectives.OBJECTIVES`): ConVIRT, MoCHi,
CACR, MV-InfoNCE.

Kept in their own module so the six original objectives stay readable; `encoders.objectives` imports this
module at its end, so there is still one registry and `get_objective("convirt")` works wherever
`encoders.objectives` is imported. Interface, distributed form and statistics as in `encoders.objectives`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from encoders.chunked import acc_dtype, pair_lse
from encoders.gather import dist_info, gather_with_grad
from encoders.objectives import (
    CLIP_LOGITS,
    ContrastiveObjective,
    LogitInit,
    Stats,
    _accuracy,
    _positive_logits,
    _stat,
    register_objective,
)

__all__ = ["CacrObjective", "ConvirtObjective", "MochiObjective", "MvInfoNceObjective", "mv_infonce"]


def _check_number(obj: ContrastiveObjective, key: str, value: Any, lo: float, hi: float, *, hi_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < lo or value > hi or (hi_open and value == hi):
        interval = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
        raise obj._err(f"{key} must be a number in {interval}, got {value!r}")


def _check_count(obj: ContrastiveObjective, key: str, value: Any, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise obj._err(f"{key} must be an integer >= {least}, got {value!r}")


def _both_directions(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Per local row: the log-sum-exp over the (global) columns of each direction, the arg-max columns, and
    the gathered features. Returns (lse_i2t, lse_t2i, arg_i2t, arg_t2i, txt_all, img_all, offset)."""
    rank, world = dist_info()
    off = rank * img.shape[0]
    if world == 1:
        r = pair_lse(img, txt, scale, chunk=chunk, cols=True)
        return r.row, r.col, r.row_arg, r.col_arg, txt, img, off
    txt_all, img_all = gather_with_grad(txt, "txt"), gather_with_grad(img, "img")
    r1 = pair_lse(img, txt_all, scale, chunk=chunk)
    r2 = pair_lse(txt, img_all, scale, chunk=chunk)
    return r1.row, r2.row, r1.row_arg, r2.row_arg, txt_all, img_all, off


# CLIP's bounds on the learnable scale, started at the paper's τ = 0.1 (used when `temperature` is null)
CONVIRT_LOGITS = replace(CLIP_LOGITS, log_scale=math.log(1 / 0.1))


@register_objective("convirt")
@dataclass
class ConvirtObjective(ContrastiveObjective):
    """ConVIRT (Zhang et al. 2020, "Contrastive Learning of Medical Visual Representations from Paired
    Images and Text"): L = mean_i [λ l_i(v->u) + (1-λ) l_i(u->v)], l_i(v->u) = -log(exp(<v_i,u_i>/τ) /
    sum_k exp(<v_i,u_k>/τ)), v = image, u = text, <,> cosine similarity.

    weight_i2t: λ, the weight of the image->text direction (the paper's 0.75); in [0, 1].
    temperature: the paper's fixed τ (0.1). None: use the model's learnable scale instead (initialised at
    1/0.1 by `logit_init`). With a fixed τ the learnable scale is unused; it is kept in the graph with a
    zero gradient (so data-parallel wrappers see every parameter used) and the logged `scale` is 1/τ.
    """

    chunk: int = 1024
    weight_i2t: float = 0.75
    temperature: float | None = 0.1
    logit_init: ClassVar[LogitInit] = CONVIRT_LOGITS

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number(self, "weight_i2t", self.weight_i2t, 0.0, 1.0)
        t = self.temperature
        if t is not None and (
            not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0
        ):
            raise self._err(f"temperature must be a positive number (or null: learnable), got {t!r}")

    def compute(self, img, txt, scale, bias, **extra):
        used = scale if self.temperature is None else torch.full_like(scale, 1.0 / self.temperature)
        lse_i2t, lse_t2i, arg_i2t, arg_t2i, _, _, off = _both_directions(img, txt, used, self.chunk)
        pos = _positive_logits(img, txt, used)
        l_i2t = (lse_i2t - pos).mean()
        l_t2i = (lse_t2i - pos).mean()
        lam = self.weight_i2t
        loss = lam * l_i2t + (1 - lam) * l_t2i
        if self.temperature is not None:
            loss = loss + 0.0 * scale.sum().to(loss.dtype)
        labels = torch.arange(off, off + img.shape[0], device=img.device)
        return loss, {
            "loss_i2t": l_i2t.detach(),
            "loss_t2i": l_t2i.detach(),
            "scale": _stat(used),
            "acc_i2t": _accuracy(arg_i2t, labels),
            "acc_t2i": _accuracy(arg_t2i, labels),
        }


@register_objective("mochi")
@dataclass
class MochiObjective(ContrastiveObjective):
    """MoCHi (Kalantidis et al. 2020, "Hard Negative Mixing for Contrastive Learning") on CLIP's symmetric
    InfoNCE: each query q (an image for image->text, a text for text->image) also meets synthetic negatives
    h = normalise(α n_a + (1-α) n_b), α ~ U(0, 1), and h' = normalise(β q + (1-β) n_c), β ~ U(0, 0.5), with
    n_a, n_b, n_c drawn uniformly from q's N hardest (highest-logit) in-batch negatives:
    l(q) = -s q.k + log(exp(s q.k) + sum_n exp(s q.n) + sum_h exp(s q.h) + sum_h' exp(s q.h')).

    n_hard: N (capped at the global batch less one); n_mix: s, the synthetic negatives mixed from two hard
    negatives; n_query_mix: s', those mixed from the query and a hard negative. s = s' = 0 is CLIP. The
    synthetic features are constants (computed without gradient, as the paper's memory-queue negatives
    are); the query still receives the gradient of its logits against them. The draws are made for the
    global batch from torch's default generator, so two ranks seeded alike make the draws of one process.
    """

    chunk: int = 1024
    n_hard: int = 16
    n_mix: int = 16
    n_query_mix: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_count(self, "n_hard", self.n_hard, 1)
        _check_count(self, "n_mix", self.n_mix, 0)
        _check_count(self, "n_query_mix", self.n_query_mix, 0)

    def _draw(self, rows: int, n: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Mixing indices into the N hardest negatives (hardest first) and coefficients, for `rows` queries."""
        s, sq = self.n_mix, self.n_query_mix
        d = {
            "a": torch.randint(n, (rows, s)),
            "b": torch.randint(n, (rows, s)),
            "alpha": torch.rand(rows, s, dtype=torch.float64),
            "c": torch.randint(n, (rows, sq)),
            "beta": torch.rand(rows, sq, dtype=torch.float64) * 0.5,
        }
        return {
            k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in d.items()
        }

    def _synthetic_logits(
        self, q: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, off: int
    ) -> torch.Tensor | None:
        """s * q . h for each local query and its s + s' synthetic negatives, [B, s + s'] (None: none)."""
        n = min(self.n_hard, cols.shape[0] - 1)
        if n < 1 or self.n_mix + self.n_query_mix == 0:
            return None
        acc = acc_dtype(q)
        b = q.shape[0]
        qd, cd = q.detach().to(acc), cols.detach().to(acc)
        with torch.no_grad():
            hard = []
            for r0 in range(0, b, self.chunk):
                sim = qd[r0 : r0 + self.chunk] @ cd.T
                rows = torch.arange(sim.shape[0], device=q.device)
                sim[rows, rows + off + r0] = float("-inf")  # the positive is no negative
                hard.append(sim.topk(n, dim=1).indices)
            hard = torch.cat(hard)  # [B, N] global column indices, hardest first
            d = self._draw(cols.shape[0], n, q.device, acc)
            d = {k: v[off : off + b] for k, v in d.items()}
            parts = []
            if self.n_mix:
                na, nb = cd[hard.gather(1, d["a"])], cd[hard.gather(1, d["b"])]  # [B, s, D]
                alpha = d["alpha"][..., None]
                parts.append(F.normalize(alpha * na + (1 - alpha) * nb, dim=-1))
            if self.n_query_mix:
                nc = cd[hard.gather(1, d["c"])]
                beta = d["beta"][..., None]
                parts.append(F.normalize(beta * qd[:, None] + (1 - beta) * nc, dim=-1))
            h = torch.cat(parts, 1)
        return torch.einsum("bd,bkd->bk", q.to(acc), h) * scale.to(acc).reshape(())

    def compute(self, img, txt, scale, bias, **extra):
        lse_i2t, lse_t2i, arg_i2t, arg_t2i, txt_all, img_all, off = _both_directions(
            img, txt, scale, self.chunk
        )
        syn_i2t = self._synthetic_logits(img, txt_all, scale, off)
        syn_t2i = self._synthetic_logits(txt, img_all, scale, off)
        if syn_i2t is not None:
            lse_i2t = torch.logaddexp(lse_i2t, torch.logsumexp(syn_i2t, 1))
            lse_t2i = torch.logaddexp(lse_t2i, torch.logsumexp(syn_t2i, 1))
        pos = _positive_logits(img, txt, scale)
        l_i2t = (lse_i2t - pos).mean()
        l_t2i = (lse_t2i - pos).mean()
        labels = torch.arange(off, off + img.shape[0], device=img.device)
        stats: Stats = {
            "loss_i2t": l_i2t.detach(),
            "loss_t2i": l_t2i.detach(),
            "scale": _stat(scale),
            "acc_i2t": _accuracy(arg_i2t, labels),
            "acc_t2i": _accuracy(arg_t2i, labels),
        }
        return (l_i2t + l_t2i) / 2, stats


@register_objective("cacr")
@dataclass
class CacrObjective(ContrastiveObjective):
    """CACR (Zheng et al. 2021, "Contrastive Attraction and Contrastive Repulsion for Representation
    Learning"): L(q) = E_{k+ ~ π+} c(q, k+) - E_{k- ~ π-} c(q, k-), c(a, b) = ||a - b||^2,
    π+(k+|q) ∝ exp(t_pos c(q, k+)), π-(k-|q) ∝ exp(-t_neg c(q, k-)): distant positives attract and close
    negatives repel more. Both directions (image queries over the texts, text queries over the images,
    every other pair of the global batch a negative), averaged over the queries, then the two halved.

    Image-text pairs give each query one positive, so π+ is a point mass there (attraction = c(q, k_i));
    t_pos weights several positives when a query has them. t_pos, t_neg >= 0 (0: uniform weights, the
    plain mean). The conditional weights π± enter as weights without gradient (the expectation is over
    π±, which the loss does not optimise), unless `weights_grad`. No logit scale: the learnable one is
    unused (kept in the graph with a zero gradient). Memory O(B * global B) per direction.
    """

    chunk: int = 1024
    t_pos: float = 1.0
    t_neg: float = 1.0
    weights_grad: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number(self, "t_pos", self.t_pos, 0.0, math.inf, hi_open=True)
        _check_number(self, "t_neg", self.t_neg, 0.0, math.inf, hi_open=True)
        if not isinstance(self.weights_grad, bool):
            raise self._err(f"weights_grad must be true or false, got {self.weights_grad!r}")

    def _direction(self, q: torch.Tensor, k_all: torch.Tensor, off: int):
        """(attraction [B], repulsion [B], arg-max column [B]) of local queries q against global keys."""
        acc = acc_dtype(q)
        q, k_all = q.to(acc), k_all.to(acc)
        b, n = q.shape[0], k_all.shape[0]
        pos = k_all[off : off + b]
        c_pos = (q - pos).pow(2).sum(-1)
        # π+ over the query's positives; with one positive per query (image-text pairs) it is 1
        w_pos = torch.softmax(self.t_pos * (c_pos if self.weights_grad else c_pos.detach())[:, None], 1)
        attract = (w_pos * c_pos[:, None]).sum(1)
        repel, args = [], []
        for r0 in range(0, b, self.chunk):
            qc = q[r0 : r0 + self.chunk]
            dot = qc @ k_all.T
            args.append(dot.detach().argmax(1))
            cost = (qc.pow(2).sum(-1, keepdim=True) + k_all.pow(2).sum(-1)[None] - 2 * dot).clamp_min(0)
            if n == 1:
                repel.append(torch.zeros(qc.shape[0], dtype=acc, device=q.device))
                continue
            rows = torch.arange(qc.shape[0], device=q.device)
            is_pos = torch.zeros_like(cost, dtype=torch.bool)
            is_pos[rows, rows + off + r0] = True
            logits = (-self.t_neg * (cost if self.weights_grad else cost.detach())).masked_fill(
                is_pos, float("-inf")
            )
            w = torch.softmax(logits, 1)
            repel.append((w * cost.masked_fill(is_pos, 0.0)).sum(1))
        return attract, torch.cat(repel), torch.cat(args)

    def compute(self, img, txt, scale, bias, **extra):
        rank, _ = dist_info()
        off = rank * img.shape[0]
        txt_all, img_all = gather_with_grad(txt, "txt"), gather_with_grad(img, "img")
        a_i2t, r_i2t, arg_i2t = self._direction(img, txt_all, off)
        a_t2i, r_t2i, arg_t2i = self._direction(txt, img_all, off)
        l_i2t = (a_i2t - r_i2t).mean()
        l_t2i = (a_t2i - r_t2i).mean()
        loss = (l_i2t + l_t2i) / 2 + 0.0 * scale.sum().to(l_i2t.dtype)
        labels = torch.arange(off, off + img.shape[0], device=img.device)
        return loss, {
            "loss_i2t": l_i2t.detach(),
            "loss_t2i": l_t2i.detach(),
            "attract": ((a_i2t.mean() + a_t2i.mean()) / 2).detach(),
            "repel": ((r_i2t.mean() + r_t2i.mean()) / 2).detach(),
            "acc_i2t": _accuracy(arg_i2t, labels),
            "acc_t2i": _accuracy(arg_t2i, labels),
        }


def mv_infonce(
    views: list[torch.Tensor], scale: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, list[list[Any]]]:
    """MV-InfoNCE over M >= 2 views [B, D] of the same B samples (local rows; the columns are gathered):
    per sample i, -log(sum_{l != m} e^{s z_i^l.z_i^m} / sum_l sum_{(j, m) != (i, l)} e^{s z_i^l.z_j^m}),
    averaged over the local samples. Returns the loss and the PairLSE of every (query view l, key view m)."""
    rank, _ = dist_info()
    b = views[0].shape[0]
    off = rank * b
    gathered = [gather_with_grad(v, f"view {k}") for k, v in enumerate(views)]
    lse, results = [], []
    for l_, q in enumerate(views):
        row = []
        for m, keys in enumerate(gathered):
            r = pair_lse(q, keys, scale, chunk=chunk, exclude_offset=off if l_ == m else None)
            lse.append(r.row)
            row.append(r)
        results.append(row)
    pos = [
        _positive_logits(views[l_], views[m], scale) for l_ in range(len(views)) for m in range(len(views))
    ]
    pos = [p for k, p in enumerate(pos) if k // len(views) != k % len(views)]  # ordered pairs l != m
    log_den = torch.logsumexp(torch.stack(lse), 0)
    log_num = torch.logsumexp(torch.stack(pos), 0)
    return (log_den - log_num).mean(), results


@register_objective("mv_infonce")
@dataclass
class MvInfoNceObjective(ContrastiveObjective):
    """MV-InfoNCE (Koromilas et al. 2025, "A Principled Framework for Multi-View Contrastive Learning"):
    one term per sample over all its views, L_i = -log(sum_{l != m} e^{s z_i^l.z_i^m} /
    sum_l sum_{(j, m) != (i, l)} e^{s z_i^l.z_j^m}); the denominator holds every other view of every
    sample (the sample's own other views included, as in the authors' code), in-modal and cross-modal.

    Here the views are the modalities, image and text (M = 2, the paper's multimodal use); the kernel
    `mv_infonce` takes any M >= 2. The learnable scale is 1/τ.
    """

    chunk: int = 1024

    def compute(self, img, txt, scale, bias, **extra):
        rank, _ = dist_info()
        off = rank * img.shape[0]
        loss, r = mv_infonce([img, txt], scale, self.chunk)
        labels = torch.arange(off, off + img.shape[0], device=img.device)
        return loss, {
            "scale": _stat(scale),
            "acc_i2t": _accuracy(r[0][1].row_arg, labels),
            "acc_t2i": _accuracy(r[1][0].row_arg, labels),
        }
