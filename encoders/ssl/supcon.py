"""SupCon (Khosla et al. 2020, "Supervised Contrastive Learning") as an objective of the self-supervised
tower (model kind `ssl`, `objective: supcon`), with labels from GeoWorld's scene graphs.

L = (τ/τ_b) · mean_i [ -1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ) ) ]  (the paper's
L^sup_out), over every view of every image in the batch as an anchor i; P(i) = the other views whose image
has i's label (i's own other views included), z the unit-norm projection of the tower's CLS token.

The batch is the rank's own: features are not gathered across processes (as in the authors' reference
code, SupContrast's `SupConLoss`), so data-parallel runs contrast within each rank's micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.ssl.options import check_choice, check_count, check_positive

#: What an image's class is, read from its scene graph's largest object (mllm.data.views_extra).
SUPCON_LABELS = ("shape", "colour", "shape_colour")


@dataclass
class SupConOptions:
    """`objective_args` of `objective: supcon`. τ = temperature, τ_b = base_temperature (the reference
    code's loss scale τ/τ_b; both 0.07 there, 0.1 here as at GeoWorld's small batch)."""

    label: str = "shape"  # shape | colour | shape_colour of the scene's largest object
    temperature: float = 0.1
    base_temperature: float = 0.1
    head_hidden: int = 256
    head_bn: bool = True  # BatchNorm in the head (SwAV's); see ProjectionHead
    out_dim: int = 64
    local_views: bool = True  # local crops (multi-crop) are anchors and positives too

    def __post_init__(self) -> None:
        check_choice("label", self.label, SUPCON_LABELS)
        check_positive("temperature", self.temperature)
        check_positive("base_temperature", self.base_temperature)
        check_count("head_hidden", self.head_hidden, 1)
        check_count("out_dim", self.out_dim, 1)


def supcon_loss(
    z: torch.Tensor, labels: torch.Tensor, temperature: float, base_temperature: float
) -> torch.Tensor:
    """z: [B, V, D] unit-norm features (V views per image), labels [B] long; a negative label is a class
    of its own (an image without a label: only its own views are its positives). Anchors without a
    positive (V = 1 and a label no other image has) are left out; if none has one, the loss is 0."""
    b, v, _ = z.shape
    flat = z.reshape(b * v, -1).float()
    lab = labels.clone()
    own = lab < 0
    lab[own] = -1 - torch.arange(int(own.sum()), device=lab.device)  # distinct negative classes
    lab = lab.repeat_interleave(v)  # view-major within each image, as flat
    logits = flat @ flat.T / temperature
    eye = torch.eye(b * v, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (lab[:, None] == lab[None, :]) & ~eye
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not bool(has.any()):
        return z.sum() * 0.0
    mean_pos = log_prob.masked_fill(~pos, 0.0).sum(1)[has] / n_pos[has]
    return -(temperature / base_temperature) * mean_pos.mean()


class ProjectionHead(nn.Module):
    """Linear -> [BatchNorm] -> GELU -> Linear -> L2 norm (SwAV's head: Linear-BN-ReLU-Linear).

    With `batch_norm` the hidden layer is normalised over the batch, which removes the component every
    image shares: a from-scratch ViT's CLS tokens start nearly identical (cosine ~0.95 on GeoWorld), and
    without centring the cluster/contrastive losses fall into the constant solution within a few steps. A
    batch of one (or eval mode) uses the running statistics."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, batch_norm: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.bn = nn.BatchNorm1d(hidden) if batch_norm else None
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.bn is not None:
            bn = self.bn
            batch_stats = bn.training and h.shape[0] > 1
            h = F.batch_norm(
                h, bn.running_mean, bn.running_var, bn.weight, bn.bias, batch_stats, bn.momentum, bn.eps
            )
        return F.normalize(self.fc2(F.gelu(h)), dim=-1)


Encode = Callable[[torch.Tensor], torch.Tensor]  # pixels [N, 3, H, W] -> CLS features [N, hidden]


def encode_views(
    encode: Encode, global_views: torch.Tensor, local_views: torch.Tensor | None, with_local: bool = True
) -> list[torch.Tensor]:
    """One [B, hidden] CLS tensor per view: the global views, then (with_local) the local crops; views of
    one size go through the tower in one call."""
    b, g = global_views.shape[:2]
    out = list(encode(global_views.flatten(0, 1)).view(b, g, -1).unbind(1))
    if with_local and local_views is not None and local_views.shape[1] > 0:
        n = local_views.shape[1]
        out += list(encode(local_views.flatten(0, 1)).view(b, n, -1).unbind(1))
    return out


class SupConObjective(nn.Module):
    """The projection head and the loss; `forward` takes the tower's encode function and the batch."""

    needs = ("class_labels",)

    def __init__(self, opts: SupConOptions, tower: Any):
        super().__init__()
        self.opts = opts
        self.head = ProjectionHead(tower.hidden_size, opts.head_hidden, opts.out_dim, opts.head_bn)

    def forward(
        self,
        encode: Encode,
        global_views: torch.Tensor,
        local_views: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if class_labels is None:
            raise ValueError("objective supcon needs class_labels in the batch (scene-graph labels)")
        feats = encode_views(encode, global_views, local_views, self.opts.local_views)
        z = torch.stack([self.head(f) for f in feats], 1)  # [B, V, out_dim]
        loss = supcon_loss(z, class_labels, self.opts.temperature, self.opts.base_temperature)
        return loss, {"supcon": loss.detach()}
