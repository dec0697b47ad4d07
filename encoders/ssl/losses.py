"""DINO and iBOT as pure functions, and their schedules (teacher temperature, EMA momentum), each
tested against a direct computation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from encoders.ssl.config import DistillConfig


def teacher_probs(logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """DINO's teacher targets: centring (subtract the running mean) then sharpening (a low temperature).

    Centring alone collapses to uniform, sharpening alone to one prototype; together they balance.
    """
    return F.softmax((logits.float() - center.float()) / temp, dim=-1)


def dino_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], student_temp: float
) -> torch.Tensor:
    """Cross-entropy H(teacher view a, student view b) averaged over pairs with a != b.

    student: one [B, K] logit tensor per view (global views first, then local ones); teacher: one [B, K]
    probability tensor per global view (the teacher only sees global views).
    """
    total, pairs = 0.0, 0
    for a, target in enumerate(teacher):
        for b, logits in enumerate(student):
            if a == b:
                continue
            total = (
                total
                + torch.sum(-target * F.log_softmax(logits.float() / student_temp, dim=-1), dim=-1).mean()
            )
            pairs += 1
    if pairs == 0:
        raise ValueError("dino_loss needs at least two views")
    return total / pairs


def ibot_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """iBOT's masked-patch loss: masked student patches predict the teacher's distribution at that patch.

    student: [B, N, K] logits of the masked view; teacher: [B, N, K] probabilities of the unmasked view;
    mask: bool [B, N]. Each image's loss is the mean over its masked patches; images without a mask do
    not count. Unmasked patches contribute nothing (their logits get no gradient).
    """
    per_patch = torch.sum(-teacher * F.log_softmax(student.float() / student_temp, dim=-1), dim=-1)  # [B, N]
    maskf = mask.float()
    count = maskf.sum(-1)
    has = count > 0
    if not bool(has.any()):
        return student.sum() * 0.0
    per_image = (per_patch * maskf).sum(-1)[has] / count[has]
    return per_image.mean()


def ibot_loss_selected(
    student: torch.Tensor, teacher: torch.Tensor, owner: torch.Tensor, n_images: int, student_temp: float
) -> torch.Tensor:
    """`ibot_loss` computed on the masked tokens only: student logits / teacher probabilities [M, K] of
    the M masked patches, `owner` [M] the image each belongs to. Same value, a fraction of the work."""
    per_patch = torch.sum(-teacher * F.log_softmax(student.float() / student_temp, dim=-1), dim=-1)  # [M]
    zeros = torch.zeros(n_images, device=per_patch.device, dtype=per_patch.dtype)
    count = zeros.index_add(0, owner, torch.ones_like(per_patch))
    total = zeros.index_add(0, owner, per_patch)
    has = count > 0
    if not bool(has.any()):
        return student.sum() * 0.0
    return (total[has] / count[has]).mean()


def updated_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> torch.Tensor:
    """center <- m * center + (1 - m) * mean of the teacher logits over the batch (all ranks)."""
    flat = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1])
    total = flat.sum(0)
    count = torch.tensor(float(flat.shape[0]), device=flat.device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
        dist.all_reduce(count)
    return center * momentum + (total / count) * (1 - momentum)


def cosine_ramp(start: float, end: float, step: int, total: int) -> float:
    """start at step 0, end at step `total`, along half a cosine (DINO's momentum schedule)."""
    if total <= 0:
        return end
    progress = min(1.0, max(0.0, step / total))
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


def teacher_temperature(cfg: DistillConfig, step: int) -> float:
    """Linear warm-up from teacher_temp_warmup to teacher_temp over teacher_temp_warmup_steps."""
    if step >= cfg.teacher_temp_warmup_steps or cfg.teacher_temp_warmup_steps <= 0:
        return cfg.teacher_temp
    frac = step / cfg.teacher_temp_warmup_steps
    return cfg.teacher_temp_warmup + (cfg.teacher_temp - cfg.teacher_temp_warmup) * frac


@torch.no_grad()
def ema_update(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float) -> None:
    """In place: teacher <- m * teacher + (1 - m) * student (student cast to the teacher's dtype)."""
    for t, s in zip(teacher, student, strict=True):
        t.mul_(momentum).add_(s.detach().to(t.dtype), alpha=1 - momentum)
