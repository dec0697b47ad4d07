"""SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments") as an objective of the self-supervised tower (model kind `ssl`, `objective: swav`).

Swapped prediction: for each global view s, codes q_s = Sinkhorn-Knopp(z_s · C) (equipartitioned over the
batch, no gradient), and every other view t (global or local crop: multi-crop) predicts them,
L = mean_s [ 1/(V-1) Σ_{t≠s} -Σ_k q_s,k log softmax(z_t · C / τ)_k ], z = unit-norm projection of the
tower's CLS token, C = unit-norm prototypes (learned).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.chunked import acc_dtype
from encoders.objectives_cluster import sinkhorn_knopp
from encoders.ssl.options import check_count, check_positive
from encoders.ssl.supcon import Encode, ProjectionHead, encode_views


@dataclass
class SwavOptions:
    """`objective_args` of `objective: swav`. SwAV's ImageNet values are τ 0.1, ε 0.05, 3 iterations and
    3000 prototypes at a batch of 4096 (with a queue below 256); here n_prototypes is at most the batch
    (refused at recipe load otherwise: the equipartition spreads the batch's B samples over K prototypes,
    and K > B leaves prototypes empty every step). No queue and no prototype freezing at the start (a
    queue does not fit a few-hundred-step CPU run; both are omitted, not emulated)."""

    n_prototypes: int = 32
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iters: int = 3
    head_hidden: int = 256
    head_bn: bool = True  # BatchNorm in the head (SwAV's); see ProjectionHead
    out_dim: int = 64

    def __post_init__(self) -> None:
        check_count("n_prototypes", self.n_prototypes, 1)
        check_positive("temperature", self.temperature)
        check_positive("epsilon", self.epsilon)
        check_count("sinkhorn_iters", self.sinkhorn_iters, 1)
        check_count("head_hidden", self.head_hidden, 1)
        check_count("out_dim", self.out_dim, 1)

    def least_batch(self) -> tuple[str, int]:
        return "n_prototypes", self.n_prototypes


def swav_loss(
    scores: list[torch.Tensor], n_assign: int, temperature: float, epsilon: float, iters: int
) -> torch.Tensor:
    """scores: one [B, K] tensor z·C per view (the first n_assign are the views whose codes are computed,
    SwAV's `crops_for_assign`); the swapped-prediction loss above. Needs at least two views."""
    if len(scores) < 2:
        raise ValueError("swav_loss needs at least two views")
    acc = acc_dtype(scores[0])  # float32 for half precision, float64 kept
    total = scores[0].new_zeros((), dtype=acc)
    for s in range(n_assign):
        q = sinkhorn_knopp(scores[s], epsilon, iters).to(acc)
        sub = 0.0
        for t, x in enumerate(scores):
            if t != s:
                sub = sub - (q * F.log_softmax(x.to(acc) / temperature, dim=-1)).sum(-1).mean()
        total = total + sub / (len(scores) - 1)
    return total / n_assign


class SwavObjective(nn.Module):
    """Projection head + prototypes; `forward` takes the tower's encode function and the views."""

    needs: tuple[str, ...] = ()

    def __init__(self, opts: SwavOptions, tower: Any):
        super().__init__()
        self.opts = opts
        self.head = ProjectionHead(tower.hidden_size, opts.head_hidden, opts.out_dim, opts.head_bn)
        self.prototypes = nn.Parameter(torch.empty(opts.n_prototypes, opts.out_dim))
        nn.init.normal_(self.prototypes)

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """z · C with both unit-norm (SwAV renormalises the prototypes after every step; normalising in
        the forward keeps them unit-norm for every use, as DINO's head does)."""
        return self.head(feats) @ F.normalize(self.prototypes, dim=-1).T

    def forward(
        self, encode: Encode, global_views: torch.Tensor, local_views: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores = [self.scores(f) for f in encode_views(encode, global_views, local_views)]
        o = self.opts
        loss = swav_loss(scores, global_views.shape[1], o.temperature, o.epsilon, o.sinkhorn_iters)
        with torch.no_grad():  # how many prototypes the batch's first view actually uses
            used = scores[0].argmax(1).unique().numel()
        return loss, {"swav": loss.detach(), "prototypes_used": torch.tensor(float(used))}
