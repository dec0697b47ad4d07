"""Clustering pieces shared by the cluster-level objectives, and ProtoCLIP on the contrastive registry.

- `sinkhorn_knopp`: SwAV's equipartitioned soft assignment of B samples to K prototypes (used by
  `encoders.ssl.swav`); distributed, the sums run over every rank's samples.
- `spherical_kmeans`: cosine k-means with a seeded k-means++ start (ProtoCLIP's episodic clustering);
  deterministic for given features, so every rank that clusters the same gathered features agrees.
- `ProtoClipObjective` ("protoclip"): CLIP + prototype-level discrimination with prototypical
  back-translation.

Registered by import in `encoders/__init__.py` (as `objectives_extra` is), so there is one registry and
`get_objective("protoclip")` works wherever the `encoders` package is imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

from encoders.chunked import acc_dtype
from encoders.gather import dist_info, gather_with_grad
from encoders.objectives import (
    CLIP_LOGITS,
    ContrastiveObjective,
    LogitInit,
    _stat,
    get_objective,
    register_objective,
)

__all__ = [
    "ProtoClipObjective",
    "back_translated_prototypes",
    "mlcd_loss",
    "sinkhorn_knopp",
    "spherical_kmeans",
    "top_k_clusters",
]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, iters: int = 3) -> torch.Tensor:
    """SwAV's codes: Q [B, K] maximising Tr(Q^T C) + eps H(Q) over the transportation polytope where every
    prototype gets 1/K of the (global) batch and every sample 1/B; returned scaled so each row sums to 1.

    scores: [B, K] sample-prototype similarities (this rank's rows). Q starts as exp(scores / eps) (less the
    global maximum, which the normalisations cancel) and alternates `iters` times: prototype sums -> 1/K
    (all-reduced over ranks), sample sums -> 1/B. After the last step the rows sum to exactly 1; the
    prototype sums approach B/K as iters grows (3 in SwAV). Computed in float64, without gradient.
    """
    if scores.dim() != 2 or scores.shape[0] == 0:
        raise ValueError(f"sinkhorn_knopp: scores must be [B>0, K], got {tuple(scores.shape)}")
    s = scores.detach().double() / epsilon
    top = s.max()
    if _distributed():
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    q = torch.exp(s - top).T  # [K, B]
    k = q.shape[0]
    b = torch.tensor(float(q.shape[1]), dtype=q.dtype, device=q.device)
    total = q.sum()
    if _distributed():
        dist.all_reduce(total)
        dist.all_reduce(b)
    q /= total
    for _ in range(iters):
        rows = q.sum(1, keepdim=True)
        if _distributed():
            dist.all_reduce(rows)
        q /= rows
        q /= k
        q /= q.sum(0, keepdim=True)
        q /= b
    q *= b
    return q.T.to(scores.dtype)


@torch.no_grad()
def spherical_kmeans(
    x: torch.Tensor, k: int, iters: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine k-means of the rows of x [N, D]: (unit centres [k, D], assignment [N] long).

    Start: k-means++ (each next centre drawn with probability ∝ its cosine distance to the nearest chosen
    one) from a generator seeded with `seed`, so the result depends on x alone and the global RNG is not
    touched. Then `iters` rounds of assign (highest cosine) / update (normalised mean); a cluster left
    empty keeps its centre. k is capped at N.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"spherical_kmeans: x must be [N>0, D], got {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"spherical_kmeans: k must be >= 1, got {k}")
    z = F.normalize(x.detach().double(), dim=-1)
    n = z.shape[0]
    k = min(k, n)
    gen = torch.Generator().manual_seed(seed)
    first = int(torch.randint(n, (), generator=gen))
    chosen = [first]
    best = 1 - z @ z[first]
    for _ in range(1, k):
        w = best.clamp_min(0).cpu()
        if float(w.sum()) <= 0:  # every point sits on a centre: take an unchosen one
            free = [i for i in range(n) if i not in set(chosen)]
            nxt = free[int(torch.randint(len(free), (), generator=gen))]
        else:
            nxt = int(torch.multinomial(w, 1, generator=gen))
        chosen.append(nxt)
        best = torch.minimum(best, 1 - z @ z[nxt])
    centres = z[chosen].clone()
    assign = (z @ centres.T).argmax(1)
    for _ in range(iters):
        sums = torch.zeros_like(centres).index_add_(0, assign, z)
        counts = torch.bincount(assign, minlength=k)
        keep = counts == 0
        centres = torch.where(keep[:, None], centres, F.normalize(sums, dim=-1))
        new = (z @ centres.T).argmax(1)
        if torch.equal(new, assign):
            break
        assign = new
    return centres.to(x.dtype), assign


@torch.no_grad()
def back_translated_prototypes(assign: torch.Tensor, other: torch.Tensor, k: int) -> torch.Tensor:
    """ProtoCLIP's prototypical back-translation: the prototype of cluster c (found in one modality) in
    the other modality's space is the normalised mean of the other modality's features of c's members.
    assign [N] in [0, k), other [N, D] -> [k, D] (a cluster without members: a zero row)."""
    sums = torch.zeros(k, other.shape[1], dtype=other.dtype, device=other.device)
    sums.index_add_(0, assign, other.detach())
    return F.normalize(sums, dim=-1)


@register_objective("protoclip")
@dataclass
class ProtoClipObjective(ContrastiveObjective):
    """ProtoCLIP (Chen et al. 2023, "ProtoCLIP: Prototypical Contrastive Language Image Pretraining"):
    L = L_CLIP + w_proto * (CE(txt . C_{I->T}^T / τ_p, y_I) + CE(img . C_{T->I}^T / τ_p, y_T)) / 2, where
    y_I, y_T are the episode's k-means clusters of the image and of the text features, and
    C_{I->T}[c] = normalise(mean of the texts whose images are in cluster c) (prototypical back-translation:
    a modality's grouping, translated into the other modality's space, is what the other modality learns
    to assign to), symmetrically C_{T->I}.

    Implemented form: the episode is the global batch (clustered every step, spherical k-means with a
    fixed seed, on the detached shared embeddings; ProtoCLIP clusters an episode of many batches with
    separate projection heads and adds an external-teacher term, neither of which is here). n_prototypes
    (K) is at most the batch (refused at recipe load: `stages.*.batch_size` must be >= K; a smaller last
    batch clusters into its own size). Prototypes carry no gradient. τ_p: proto_temperature (> 0).
    """

    chunk: int = 1024
    n_prototypes: int = 16
    proto_temperature: float = 0.05
    w_proto: float = 1.0
    kmeans_iters: int = 10
    logit_init: ClassVar[LogitInit] = CLIP_LOGITS

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, least in (("n_prototypes", 1), ("kmeans_iters", 0)):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise self._err(f"{key} must be an integer >= {least}, got {v!r}")
        for key, positive in (("proto_temperature", True), ("w_proto", False)):
            v = getattr(self, key)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or v < 0 or (positive and v == 0):
                raise self._err(
                    f"{key} must be a {'positive' if positive else 'non-negative'} number, got {v!r}"
                )

    def least_batch(self) -> tuple[str, int]:
        """(option, the least global batch it needs): K clusters need K samples per episode."""
        return "n_prototypes", self.n_prototypes

    def _proto_ce(
        self, q: torch.Tensor, protos: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        acc = acc_dtype(q)
        logits = q.to(acc) @ protos.to(acc).T / self.proto_temperature
        return F.cross_entropy(logits, targets), (logits.detach().argmax(1) == targets).float().mean()

    def compute(self, img, txt, scale, bias, **extra):
        clip_loss, stats = self._infonce(img, txt, scale, chunk=self.chunk, exclude_positive=False)
        rank, _ = dist_info()
        b = img.shape[0]
        off = rank * b
        img_all, txt_all = gather_with_grad(img, "img"), gather_with_grad(txt, "txt")
        k = min(self.n_prototypes, img_all.shape[0])
        _, y_img = spherical_kmeans(img_all, k, self.kmeans_iters)
        _, y_txt = spherical_kmeans(txt_all, k, self.kmeans_iters)
        c_i2t = back_translated_prototypes(y_img, txt_all, k)  # image clusters, in text space
        c_t2i = back_translated_prototypes(y_txt, img_all, k)  # text clusters, in image space
        l_txt, acc_txt = self._proto_ce(txt, c_i2t, y_img[off : off + b])
        l_img, acc_img = self._proto_ce(img, c_t2i, y_txt[off : off + b])
        proto = (l_txt + l_img) / 2
        loss = clip_loss + self.w_proto * proto
        stats.update(
            loss_clip=clip_loss.detach(),
            loss_proto=proto.detach(),
            proto_acc_txt=acc_txt,
            proto_acc_img=acc_img,
            scale=_stat(scale),
        )
        return loss, stats


def objective_least_batch(objective: str, objective_args: dict) -> tuple[str, int] | None:
    """(option key, least batch) for a contrastive objective whose options need one (ProtoCLIP's K
    prototypes), else None; the recipe loader refuses a stage whose batch is smaller, naming the key."""
    fn = getattr(get_objective(objective, **objective_args), "least_batch", None)
    return fn() if fn is not None else None


def top_k_clusters(x: torch.Tensor, centres: torch.Tensor, k: int) -> torch.Tensor:
    """MLCD's positive labels: the k centres with the highest cosine to each row of x [N, D] -> [N, k]
    (nearest first)."""
    sim = F.normalize(x.detach().double(), dim=-1) @ F.normalize(centres.double(), dim=-1).T
    return sim.topk(k, dim=1).indices


def mlcd_loss(cos: torch.Tensor, positives: torch.Tensor, scale: float, margin: float = 0.0) -> torch.Tensor:
    """MLCD (An et al. 2024), multi-label cluster discrimination with the positives' and negatives' terms
    decoupled: per sample, log(1 + Σ_{j ∈ Ω_n} e^{s cos_j}) + log(1 + Σ_{i ∈ Ω_p} e^{-s (cos_i - m)}),
    averaged over the samples. cos [B, K] sample-centre cosines; positives [B, k] the positive cluster ids."""
    s = cos.float() * scale
    is_pos = torch.zeros_like(s, dtype=torch.bool).scatter_(1, positives, True)
    neg = s.masked_fill(is_pos, float("-inf"))
    pos = (-(s - scale * margin)).masked_fill(~is_pos, float("-inf"))
    zero = torch.zeros(s.shape[0], 1, dtype=s.dtype, device=s.device)
    l_neg = torch.logsumexp(torch.cat([zero, neg], 1), 1)  # log(1 + Σ e^{...})
    l_pos = torch.logsumexp(torch.cat([zero, pos], 1), 1)
    return (l_neg + l_pos).mean()
