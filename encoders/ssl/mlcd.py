"""MLCD (An et al. 2024, "Multi-label Cluster Discrimination for Visual Representation Learning") as an
objective of the self-supervised tower (model kind `ssl`, `objective: mlcd`).

Offline clustering: the training images' features are clustered into K classes (spherical k-means) and
each image's positive classes are its k nearest centres (`encoders.objectives_cluster.top_k_clusters`).
Training: a learnable, unit-norm classifier W [K, D] over the projected CLS token z (unit norm);
L = mean over views of log(1 + Σ_{j∉P} e^{s z·W_j}) + log(1 + Σ_{i∈P} e^{-s (z·W_i - m)})
(`encoders.objectives_cluster.mlcd_loss`: positives and negatives decoupled, as in the paper).

Where "offline" happens here: at the start of the stage (`mllm.data.views_extra`, when the ssl task builds
its data), from the *starting* tower's CLS features of every training image, unaugmented; the clustering
is deterministic (fixed k-means seed), so a resumed stage recomputes exactly the same labels from the same
starting weights. The labels are not written to disk. The paper clusters features of a separate, already
trained CLIP model over LAION (K = 1M, k = 8, negative-class sampling); here the starting tower is the one
being trained (the recipe can start it from a trained tower with `model.init_from` or `model.tower.path`),
K and k are small, and every class is a negative. The classifier starts random (the clusters are labels,
not weights). Both global views of each image are classified; local crops are not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.common import ConfigError
from encoders.objectives_cluster import mlcd_loss
from encoders.ssl.options import WHERE, check_count, check_positive
from encoders.ssl.supcon import Encode, ProjectionHead


@dataclass
class MlcdOptions:
    """`objective_args` of `objective: mlcd`: n_clusters K, n_positive k (<= K), scale s, margin m."""

    n_clusters: int = 32
    n_positive: int = 3
    scale: float = 16.0
    margin: float = 0.0
    kmeans_iters: int = 20
    head_hidden: int = 256
    head_bn: bool = True  # BatchNorm in the head (SwAV's); see ProjectionHead
    out_dim: int = 64

    def __post_init__(self) -> None:
        check_count("n_clusters", self.n_clusters, 1)
        check_count("n_positive", self.n_positive, 1)
        if self.n_positive > self.n_clusters:
            raise ConfigError(
                f"{WHERE}.n_positive={self.n_positive} is larger than {WHERE}.n_clusters={self.n_clusters}"
            )
        check_positive("scale", self.scale)
        m = self.margin
        if not isinstance(m, (int, float)) or isinstance(m, bool) or not 0.0 <= m < 1.0:
            raise ConfigError(f"{WHERE}.margin must be a number in [0, 1), got {m!r}")
        check_count("kmeans_iters", self.kmeans_iters, 0)
        check_count("head_hidden", self.head_hidden, 1)
        check_count("out_dim", self.out_dim, 1)


class MlcdObjective(nn.Module):
    """Projection head + the K-class classifier; the positives come with the batch (`cluster_labels`)."""

    needs = ("cluster_labels",)

    def __init__(self, opts: MlcdOptions, tower: Any):
        super().__init__()
        self.opts = opts
        self.head = ProjectionHead(tower.hidden_size, opts.head_hidden, opts.out_dim, opts.head_bn)
        self.classes = nn.Parameter(torch.empty(opts.n_clusters, opts.out_dim))
        nn.init.normal_(self.classes)

    def forward(
        self,
        encode: Encode,
        global_views: torch.Tensor,
        local_views: torch.Tensor | None = None,
        cluster_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if cluster_labels is None:
            raise ValueError("objective mlcd needs cluster_labels in the batch (the offline clustering's)")
        b, g = global_views.shape[:2]
        z = self.head(encode(global_views.flatten(0, 1)))  # [B*g, out]
        cos = z @ F.normalize(self.classes, dim=-1).T
        labels = cluster_labels.repeat_interleave(g, 0)
        loss = mlcd_loss(cos, labels, self.opts.scale, self.opts.margin)
        with torch.no_grad():
            hit = (cos.argmax(1, keepdim=True) == labels).any(1).float().mean()
        return loss, {"mlcd": loss.detach(), "top1_in_positives": hit}
