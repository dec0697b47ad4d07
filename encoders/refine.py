"""CLIP-Refine (Yamaguchi et al. 2025, "Post-pre-training for Modality Alignment in Vision-Language
Foundation Models"): a short post-pre-training stage on an already trained contrastive pair that narrows the
modality gap without forgetting what the pair knows.

    L = w_hycd * L_HyCD + w_rafa * L_RaFA

- RaFA, random feature alignment: each pair (image i, caption i) draws one reference vector r_i from the
  prior N(mu, sigma^2 I) (the paper's standard normal by default), and both embeddings are pulled towards it:
  L_RaFA = mean_{i,d} (v_id - r_id)^2 + mean_{i,d} (u_id - r_id)^2 (v, u: the L2-normalised image and text
  embeddings; the means over the B x D elements, as the authors' code takes them with `mse_loss`). The
  same r_i for both modalities aligns them to one shared prior instead of to each other.
- HyCD, hybrid contrastive-distillation: the in-batch contrastive cross-entropy, with the one-hot target
  replaced by the hybrid label y_i = alpha * onehot(i) + (1 - alpha) * softmax(s_0 v0_i . U0^T / T), where
  v0, U0, s_0 are the frozen pre-trained pair's (the teacher, the model as the stage found it) embeddings and
  logit scale: L_HyCD = T^2 * mean_i KL(y_i || softmax(s v_i . U^T / T)), both directions (image->text
  rows and text->image rows) averaged. alpha = 1 is CLIP's InfoNCE; alpha = 0 pure distillation.

Implemented form (where the abstract is silent): the student's logits use its own learnable scale s, the
teacher's its frozen one (the authors' code divides raw cosines by T; with T = 1 and CLIP's scale this is the
usual CLIP softmax); KL, not cross-entropy (same gradient, the value is 0 at a perfect match). No separate
CLIP term: HyCD at alpha = 1 is it.

Distributed (world > 1): the local form of `encoders.objectives` (this rank's rows, every rank's columns
gathered, student with gradient and teacher without; positives at column rank * B + i), so the mean over
ranks is the loss of one process on the gathered batch. RaFA is per sample. Each rank draws its own
references from torch's default generator.

`RefineModule` wraps a `ContrastiveModel` for training: it registers the model's own children under their
own names (so a stage's trainable prefixes, checkpoints and the saved model are the model's), keeps a frozen
deep copy as the teacher outside the module tree (no parameters, not in checkpoints: on resume it is the
stage's starting model again, as it should be) and computes the loss above.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.common import ConfigError
from encoders.contrastive import ContrastiveModel, ContrastiveOutput
from encoders.gather import dist_info, gather_no_grad, gather_with_grad

__all__ = ["RefineConfig", "RefineModule", "draw_references", "hycd_loss", "rafa_loss", "refine_loss"]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class RefineConfig:
    """A `refine` stage's CLIP-Refine settings (the stage's `refine:` section; checked when the recipe loads).

    alpha: HyCD's weight of the ground-truth labels in the hybrid target, in [0, 1] (1: CLIP's InfoNCE).
    temperature: the distillation temperature T (> 0) dividing both logits (loss scaled by T^2).
    weight_hycd, weight_rafa: the two terms' weights (>= 0, not both 0).
    prior_mean, prior_std: RaFA's prior N(mean, std^2) for the reference vectors (std > 0).
    """

    alpha: float = 0.5
    temperature: float = 1.0
    weight_hycd: float = 1.0
    weight_rafa: float = 1.0
    prior_mean: float = 0.0
    prior_std: float = 1.0

    def __post_init__(self) -> None:
        if not _number(self.alpha) or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(
                f"refine.alpha (HyCD's label mixing weight) must be in [0, 1], got {self.alpha!r}"
            )
        for key in ("temperature", "prior_std"):
            v = getattr(self, key)
            if not _number(v) or v <= 0:
                raise ConfigError(f"refine.{key} must be a positive number, got {v!r}")
        for key in ("weight_hycd", "weight_rafa"):
            v = getattr(self, key)
            if not _number(v) or v < 0:
                raise ConfigError(f"refine.{key} must be a number >= 0, got {v!r}")
        if self.weight_hycd == 0 and self.weight_rafa == 0:
            raise ConfigError("refine.weight_hycd and refine.weight_rafa are both 0: nothing to train")
        if not _number(self.prior_mean):
            raise ConfigError(f"refine.prior_mean must be a finite number, got {self.prior_mean!r}")


def draw_references(like: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """RaFA's reference vectors: one draw from N(mean, std^2 I) per row of `like` ([B, D]), no gradient."""
    return torch.randn(like.shape, dtype=like.dtype, device=like.device) * std + mean


def rafa_loss(img: torch.Tensor, txt: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """L_RaFA = mean (img - ref)^2 + mean (txt - ref)^2 over the B x D elements; `ref` shared by the pair."""
    ref = ref.detach()
    return F.mse_loss(img, ref) + F.mse_loss(txt, ref)


def _kl_rows(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """mean over rows of KL(target || softmax(logits)); 0 * log 0 = 0."""
    logp = torch.log_softmax(logits, dim=1)
    return (torch.xlogy(target, target) - target * logp).sum(1).mean()


def hycd_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    t_img: torch.Tensor,
    t_txt: torch.Tensor,
    scale: torch.Tensor,
    t_scale: torch.Tensor,
    alpha: float,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """HyCD on local rows (see the module docstring): (T^2 * (KL_i2t + KL_t2i) / 2, statistics).

    img, txt: the student's normalised embeddings [B, D]; t_img, t_txt: the teacher's (no gradient);
    scale, t_scale: their logit scales (1-element tensors)."""
    rank, world = dist_info()
    b = img.shape[0]
    off = rank * b
    acc = torch.float64 if img.dtype == torch.float64 else torch.float32
    img, txt = img.to(acc), txt.to(acc)
    t_img, t_txt = t_img.detach().to(acc), t_txt.detach().to(acc)
    if world > 1:
        txt_all, img_all = gather_with_grad(txt, "txt"), gather_with_grad(img, "img")
        t_txt_all, t_img_all = gather_no_grad(t_txt), gather_no_grad(t_img)
    else:
        txt_all, img_all, t_txt_all, t_img_all = txt, img, t_txt, t_img
    s = scale.to(acc).reshape(()) / temperature
    s0 = t_scale.detach().to(acc).reshape(()) / temperature
    onehot = F.one_hot(torch.arange(off, off + b, device=img.device), txt_all.shape[0]).to(acc)
    losses, accs = [], []
    for q, keys, tq, tkeys in ((img, txt_all, t_img, t_txt_all), (txt, img_all, t_txt, t_img_all)):
        logits = s * q @ keys.T
        with torch.no_grad():
            target = alpha * onehot + (1 - alpha) * torch.softmax(s0 * tq @ tkeys.T, dim=1)
        losses.append(_kl_rows(target, logits))
        accs.append((logits.detach().argmax(1) == onehot.argmax(1)).to(acc).mean())
    loss = temperature**2 * (losses[0] + losses[1]) / 2
    stats = {
        "loss_i2t": losses[0].detach(),
        "loss_t2i": losses[1].detach(),
        "acc_i2t": accs[0],
        "acc_t2i": accs[1],
    }
    return loss, stats


def refine_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    t_img: torch.Tensor,
    t_txt: torch.Tensor,
    scale: torch.Tensor,
    t_scale: torch.Tensor,
    cfg: RefineConfig,
    ref: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """w_hycd * L_HyCD + w_rafa * L_RaFA, with `ref` drawn from the prior when not given."""
    hycd, stats = hycd_loss(img, txt, t_img, t_txt, scale, t_scale, cfg.alpha, cfg.temperature)
    if ref is None:
        ref = draw_references(img.detach(), cfg.prior_mean, cfg.prior_std)
    rafa = rafa_loss(img, txt, ref).to(hycd.dtype)
    loss = cfg.weight_hycd * hycd + cfg.weight_rafa * rafa
    with torch.no_grad():  # the modality gap: distance between the two modalities' mean embeddings
        gap = (img.float().mean(0) - txt.float().mean(0)).norm()
    stats.update(loss_hycd=hycd.detach(), loss_rafa=rafa.detach(), scale=scale.detach().reshape(()), gap=gap)
    return loss, stats


class RefineModule(nn.Module):
    """The module a `refine` stage trains: the model's own parts under their own names, plus a frozen
    teacher (a deep copy of the model as given) kept outside the module tree."""

    def __init__(self, model: ContrastiveModel, cfg: RefineConfig):
        super().__init__()
        if not isinstance(model, ContrastiveModel):
            raise TypeError(f"CLIP-Refine trains a contrastive pair; got a {type(model).__name__}")
        for name, child in model.named_children():
            self.add_module(name, child)
        self.__dict__["model"] = model
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.__dict__["teacher"] = teacher
        self.cfg = cfg

    def _teacher_on(self, device: torch.device) -> ContrastiveModel:
        teacher: ContrastiveModel = self.__dict__["teacher"]
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        return teacher

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any
    ) -> ContrastiveOutput:
        model: ContrastiveModel = self.__dict__["model"]
        img = model.encode_image(pixel_values)
        txt = model.encode_text(input_ids, attention_mask)
        teacher = self._teacher_on(pixel_values.device)
        with torch.no_grad():
            dtype = next(teacher.parameters()).dtype
            t_img = teacher.encode_image(pixel_values.to(dtype))
            t_txt = teacher.encode_text(input_ids, attention_mask)
            t_scale = teacher.logit_scale()
        loss, stats = refine_loss(img, txt, t_img, t_txt, model.logit_scale(), t_scale, self.cfg)
        return ContrastiveOutput(loss, stats)

    def after_step(self) -> None:
        """The model's own post-step rule (the logit-scale clamp)."""
        self.__dict__["model"].after_step()
