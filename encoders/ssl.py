"""Self-supervised vision pretraining: DINO self-distillation + iBOT masked image modelling.

A tower trained on images alone (no text) sees what captions do not name, which is why Mixture of
Features pairs one beside a CLIP-style tower. The pieces here are shared by `encoders.tips` (TIPS adds the
same two losses to its dual-caption contrastive training):

- augmentation in torch only (random resized crop, flip, colour jitter): the views DINO compares;
- `block_mask`: BEiT/iBOT-style blockwise patch masking; the mask goes into the HF backbone through
  its own `bool_masked_pos` (Dinov2's learned mask token), not a re-implementation;
- `DINOHead`: MLP -> L2-normalised bottleneck -> prototypes with unit-norm rows (the weight-normed last
  layer with its gain frozen at 1, DINO's `norm_last_layer`);
- `EMATeacher`: an exponential moving average of the student kept as fp32 *buffers* and run with
  `torch.func.functional_call` on the student's own modules, so there is no second copy of the module
  tree, DeepSpeed never casts or partitions it, and checkpoints carry it like any buffer;
- the losses as pure functions (`dino_loss`, `ibot_loss`, `teacher_probs`, `updated_center`), tested
  against direct computations;
- `SelfDistillation`: heads + teacher + centres, the one place the schedule (teacher temperature,
  EMA momentum) is applied;
- `SSLModel` (model kind `ssl`): an HF `Dinov2Model` tower trained by `SelfDistillation`; it saves the
  tower as an ordinary HF folder (`image_tower/`) that `TowerConfig(type="dinov2", path=...)` loads.

The EMA update runs lazily at the first micro-batch of each optimiser step (it folds in the student of
the previous step), because the engine owns the optimiser step and DeepSpeed may step inside
`engine.step()`; the order "forward, step, EMA, forward" is the same as DINO's loop, and a resumed run
repeats it exactly because the micro-batch counter is a buffer saved with the checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from encoders.towers import Tower, TowerConfig, build_tower

# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


@dataclass
class AugmentConfig:
    """DINO's view recipe at GeoWorld scale. Scales are fractions of the image area."""

    global_scale: tuple[float, float] = (0.4, 1.0)  # DINO: (0.32, 1.0); GeoWorld objects are small
    local_crops: int = 0  # extra small views for the student only (multi-crop); 0 = two global views only
    local_size: int = 32  # px; Dinov2 interpolates its position embeddings, so any multiple of the patch
    local_scale: tuple[float, float] = (0.1, 0.4)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    # Brightness/contrast/saturation factors are drawn in [1 - s, 1 + s]. Colour is a label in GeoWorld,
    # so hue is never jittered (it would teach the tower that red == blue).
    jitter: float = 0.3


@dataclass
class DistillConfig:
    """DINO + iBOT settings. Defaults are DINO/iBOT's ViT-S values scaled down where GeoWorld is tiny."""

    out_dim: int = 1024  # prototypes of the CLS head (DINO: 65536; 1024 suffices for a few thousand images)
    patch_out_dim: int = 1024  # prototypes of the patch (iBOT) head; a separate head, as in DINOv2
    head_hidden: int = 512
    head_bottleneck: int = 128
    head_layers: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.07  # final teacher temperature (sharpening)
    teacher_temp_warmup: float = 0.04  # initial teacher temperature, raised linearly to teacher_temp
    teacher_temp_warmup_steps: int = 30
    center_momentum: float = 0.9
    ema_momentum: float = 0.996  # teacher momentum at step 0, raised along a cosine to ema_momentum_end
    ema_momentum_end: float = 1.0
    mask_prob: float = 0.5  # share of global views that get a patch mask (iBOT)
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # masked share of patches, drawn uniformly per view
    dino_weight: float = 1.0
    ibot_weight: float = 1.0


@dataclass
class SSLConfig:
    """`ModelConfig.encoder` of model kind `ssl`."""

    distill: DistillConfig = field(default_factory=DistillConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    export: str = "student"  # which weights become image_tower/: "student" | "teacher" (DINO evaluates the
    # teacher; in a few hundred steps the EMA lags the student, so the tiny recipes keep the student)


def config_from_dict(cls: type, data: dict[str, Any] | None, where: str) -> Any:
    """A nested config dataclass from a recipe's free-form dict; unknown keys are errors naming the key."""
    from mllm.config import from_dict

    return from_dict(cls, data or {}, where)


# --------------------------------------------------------------------------------------------------------
# Augmentation (torch only)
# --------------------------------------------------------------------------------------------------------


def image_to_tensor(image: Any) -> torch.Tensor:
    """PIL RGB image -> float [3, H, W] in [0, 1]."""
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def _uniform(lo: float, hi: float, gen: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def random_resized_crop(
    image: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """A crop of random area share `scale` and aspect `ratio` (log-uniform), resized to size x size.

    Ten tries, then the whole image (the same fall-back as the usual implementation).
    """
    _, height, width = image.shape
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = (0, 0, height, width)
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1], gen)
        aspect = math.exp(_uniform(*log_ratio, gen))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=gen))
            left = int(torch.randint(0, width - w + 1, (), generator=gen))
            box = (top, left, h, w)
            break
    top, left, h, w = box
    crop = image[:, top : top + h, left : left + w].unsqueeze(0)
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def _grey(image: torch.Tensor) -> torch.Tensor:
    r, g, b = image[0], image[1], image[2]
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(0)


def color_jitter(image: torch.Tensor, strength: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Brightness, contrast and saturation by factors in [1-s, 1+s], in a random order; values in [0, 1]."""
    ops = torch.randperm(3, generator=gen).tolist()
    for op in ops:
        factor = _uniform(1 - strength, 1 + strength, gen)
        if op == 0:
            image = image * factor
        elif op == 1:
            image = (image - _grey(image).mean()) * factor + _grey(image).mean()
        else:
            grey = _grey(image)
            image = (image - grey) * factor + grey
        image = image.clamp(0.0, 1.0)
    return image


class Augmenter:
    """Turns one image into DINO's views, normalised with the tower processor's mean and std."""

    def __init__(self, cfg: AugmentConfig, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.cfg = cfg
        self.size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def view(
        self, image: torch.Tensor, size: int, scale: tuple[float, float], gen: torch.Generator | None = None
    ) -> torch.Tensor:
        out = random_resized_crop(image, size, scale, self.cfg.ratio, gen)
        if float(torch.rand((), generator=gen)) < self.cfg.flip_prob:
            out = out.flip(-1)
        if float(torch.rand((), generator=gen)) < self.cfg.jitter_prob:
            out = color_jitter(out, self.cfg.jitter, gen)
        return (out - self.mean) / self.std

    def __call__(self, image: torch.Tensor, gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        views = {
            "global_views": torch.stack(
                [self.view(image, self.size, self.cfg.global_scale, gen) for _ in range(2)]
            )
        }
        if self.cfg.local_crops:
            views["local_views"] = torch.stack(
                [
                    self.view(image, self.cfg.local_size, self.cfg.local_scale, gen)
                    for _ in range(self.cfg.local_crops)
                ]
            )
        return views


def block_mask(
    grid: tuple[int, int], ratio: float, gen: torch.Generator | None = None, min_block: int = 2
) -> torch.Tensor:
    """A bool [h*w] mask covering ~`ratio` of the patches with random rectangles (BEiT/iBOT blockwise).

    Blocks of at least `min_block` patches with aspect in [0.3, 3.3] are added until the target is met;
    the last step fills single random patches so the masked count is exactly round(ratio * h * w).
    """
    h, w = grid
    total = h * w
    target = int(round(ratio * total))
    mask = torch.zeros(h, w, dtype=torch.bool)
    for _ in range(100):
        left = target - int(mask.sum())
        if left < min_block:
            break
        area = _uniform(min_block, max(min_block, left), gen)
        aspect = math.exp(_uniform(math.log(0.3), math.log(1 / 0.3), gen))
        bh = max(1, min(h, int(round(math.sqrt(area * aspect)))))
        bw = max(1, min(w, int(round(math.sqrt(area / aspect)))))
        top = int(torch.randint(0, h - bh + 1, (), generator=gen))
        lft = int(torch.randint(0, w - bw + 1, (), generator=gen))
        block = mask[top : top + bh, lft : lft + bw]
        if int((~block).sum()) > left:  # would overshoot: try another shape
            continue
        block.fill_(True)
    flat = mask.flatten()
    left = target - int(flat.sum())
    if left > 0:
        free = (~flat).nonzero().flatten()
        flat[free[torch.randperm(len(free), generator=gen)[:left]]] = True
    return flat


def sample_masks(
    n_views: int,
    grid: tuple[int, int],
    prob: float,
    ratio: tuple[float, float],
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """bool [n_views, h*w]: each view is masked with probability `prob`, at a ratio drawn in `ratio`."""
    masks = torch.zeros(n_views, grid[0] * grid[1], dtype=torch.bool)
    for v in range(n_views):
        if float(torch.rand((), generator=gen)) < prob:
            masks[v] = block_mask(grid, _uniform(ratio[0], ratio[1], gen), gen)
    return masks


# --------------------------------------------------------------------------------------------------------
# Losses and schedules (pure functions)
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> cosine against unit-norm prototypes (weight norm with g = 1).

    Normalising the prototype rows is DINO's `norm_last_layer=True`: it keeps any one prototype from
    winning by growing its norm, which is one of the collapse modes.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512, bottleneck: int = 128, layers: int = 3):
        super().__init__()
        if layers < 1:
            raise ValueError("DINOHead needs at least one layer")
        dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        mlp: list[nn.Module] = []
        for i in range(layers):
            mlp.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mlp.append(nn.GELU())
        self.mlp = nn.Sequential(*mlp)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        return F.linear(z, F.normalize(self.prototypes, dim=-1))


class EMATeacher(nn.Module):
    """An EMA copy of some student modules, stored as fp32 buffers, run through the students' own code.

    `sources` maps a short name to a student module; the teacher copies every parameter and floating
    buffer of each. `run(name, *args)` calls that student module with the teacher's tensors in place of
    its own (`torch.func.functional_call`), without gradients.
    """

    def __init__(self, sources: dict[str, nn.Module]):
        super().__init__()
        self._sources = dict(sources)  # a plain dict: not registered, so the students are not duplicated
        self._keys: dict[str, list[tuple[str, str]]] = {}
        for src, module in self._sources.items():
            keys = []
            for name, tensor in self._student_tensors(module):
                buf = f"{src}__{name.replace('.', '__')}"
                self.register_buffer(buf, tensor.detach().clone().float())
                keys.append((name, buf))
            self._keys[src] = keys

    @staticmethod
    def _student_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
        out = [(n, p) for n, p in module.named_parameters()]
        out += [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
        return out

    def _check_not_partitioned(self, module: nn.Module) -> None:
        if any(hasattr(p, "ds_status") for p in module.parameters()):
            raise RuntimeError(
                "an EMA teacher needs whole parameters; ZeRO-3 partitions them. "
                "Use ZeRO-0/1/2 (train/ds/zero2.json) for ssl/tips stages."
            )

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        for src, module in self._sources.items():
            self._check_not_partitioned(module)
            student = dict(self._student_tensors(module))
            names = [n for n, _ in self._keys[src]]
            ema_update([getattr(self, b) for _, b in self._keys[src]], [student[n] for n in names], momentum)

    @torch.no_grad()
    def run(self, src: str, *args: Any, **kwargs: Any) -> Any:
        module = self._sources[src]
        self._check_not_partitioned(module)
        tensors = {n: getattr(self, b) for n, b in self._keys[src]}
        return torch.func.functional_call(module, tensors, args, kwargs, strict=True)

    def state_for(self, src: str) -> dict[str, torch.Tensor]:
        """The teacher's copy of one student module, under the student's own parameter names."""
        return {n: getattr(self, b) for n, b in self._keys[src]}


@dataclass
class SSLOutput:
    loss: torch.Tensor
    parts: dict[str, float]


def backbone_tokens(
    model: nn.Module, pixel_values: torch.Tensor, mask: torch.Tensor | None, n_prefix: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLS [B, D], patch tokens [B, N, D]) of a Dinov2-family HF model, after its final LayerNorm."""
    out = model(pixel_values=pixel_values.to(dtype), bool_masked_pos=mask)
    hidden = out.last_hidden_state
    return hidden[:, 0], hidden[:, n_prefix:]


class SelfDistillation(nn.Module):
    """DINO (CLS level, across views) + iBOT (masked patches) on a Dinov2-family backbone.

    The caller owns the backbone (it is the tower being trained); this module owns the heads, the EMA
    teacher of backbone + heads, the running centres and the micro-batch counter that drives the
    schedules. `grad_accum` and `total_steps` come from the stage, so the schedules count optimiser steps.
    """

    def __init__(
        self,
        backbone: nn.Module,
        hidden: int,
        n_prefix: int,
        cfg: DistillConfig,
        grad_accum: int = 1,
        total_steps: int = 1,
    ):
        super().__init__()
        self.cfg = cfg
        self._backbone = [backbone]  # not registered here: the owner registers it (as its tower)
        self.n_prefix = n_prefix
        self.grad_accum = max(1, int(grad_accum))
        self.total_steps = max(1, int(total_steps))
        self.cls_head = DINOHead(hidden, cfg.out_dim, cfg.head_hidden, cfg.head_bottleneck, cfg.head_layers)
        self.patch_head = DINOHead(
            hidden, cfg.patch_out_dim, cfg.head_hidden, cfg.head_bottleneck, cfg.head_layers
        )
        self.teacher = EMATeacher(
            {"backbone": backbone, "cls_head": self.cls_head, "patch_head": self.patch_head}
        )
        self.register_buffer("cls_center", torch.zeros(1, cfg.out_dim))
        self.register_buffer("patch_center", torch.zeros(1, 1, cfg.patch_out_dim))
        self.register_buffer("micro_batches", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self) -> nn.Module:
        return self._backbone[0]

    def configure_schedule(self, grad_accum: int, total_steps: int) -> None:
        """A new stage: its own step count, schedules from their start. (A resume then restores the
        counter from the checkpoint, since the engine loads it after the task has built the stage.)"""
        self.grad_accum = max(1, int(grad_accum))
        self.total_steps = max(1, int(total_steps))
        self.micro_batches.zero_()

    @property
    def step(self) -> int:
        return int(self.micro_batches) // self.grad_accum

    def _dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def forward(
        self,
        global_views: torch.Tensor,
        local_views: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float], list[torch.Tensor]]:
        """global_views [B, 2, 3, H, W], local_views [B, L, 3, h, w] or None, masks bool [B, 2, N] or None.

        Returns (loss, parts, student CLS tokens of the global views); TIPS reuses the CLS tokens.
        """
        step = self.step  # optimiser steps taken so far, read before this micro-batch is counted
        if self.training:
            if int(self.micro_batches) > 0 and int(self.micro_batches) % self.grad_accum == 0:
                self.teacher.update(
                    cosine_ramp(self.cfg.ema_momentum, self.cfg.ema_momentum_end, step - 1, self.total_steps)
                )
            self.micro_batches += 1
        cfg, dtype = self.cfg, self._dtype()
        b, n_global = global_views.shape[:2]
        if n_global != 2:
            raise ValueError(f"self-distillation expects 2 global views per image, got {n_global}")
        flat = global_views.flatten(0, 1)  # [B*2, 3, H, W], view-major within each image
        flat_mask = masks.flatten(0, 1) if masks is not None else None
        temp = teacher_temperature(cfg, step)

        # The patch heads only run on masked positions (the only ones iBOT scores): ~15% of the tokens.
        has_mask = flat_mask is not None and cfg.ibot_weight > 0 and bool(flat_mask.any())
        s_cls, s_patch = backbone_tokens(self.backbone, flat, flat_mask, self.n_prefix, dtype)
        with torch.no_grad():
            t_hidden = self.teacher.run("backbone", pixel_values=flat.float()).last_hidden_state
            t_cls_logits = self.teacher.run("cls_head", t_hidden[:, 0])
            if has_mask:
                t_patch_logits = self.teacher.run("patch_head", t_hidden[:, self.n_prefix :][flat_mask])
        del t_hidden
        s_cls_logits = self.cls_head(s_cls)
        student_views = list(s_cls_logits.view(b, 2, -1).unbind(1))
        if local_views is not None and local_views.shape[1] > 0:
            lv = local_views.flatten(0, 1)
            l_cls, _ = backbone_tokens(self.backbone, lv, None, self.n_prefix, dtype)
            student_views += list(self.cls_head(l_cls).view(b, local_views.shape[1], -1).unbind(1))
        t_probs = teacher_probs(t_cls_logits, self.cls_center, temp).view(b, 2, -1).unbind(1)
        l_dino = dino_loss(student_views, t_probs, cfg.student_temp)
        parts = {"dino": float(l_dino.detach())}
        loss = cfg.dino_weight * l_dino
        if has_mask:
            owner = flat_mask.nonzero()[:, 0]  # the view each masked token belongs to (row-major order)
            s_patch_logits = self.patch_head(s_patch[flat_mask])
            t_patch_probs = teacher_probs(t_patch_logits, self.patch_center.view(1, -1), temp)
            l_ibot = ibot_loss_selected(
                s_patch_logits, t_patch_probs, owner, flat_mask.shape[0], cfg.student_temp
            )
            parts["ibot"] = float(l_ibot.detach())
            loss = loss + cfg.ibot_weight * l_ibot
        if self.training:
            with torch.no_grad():
                self.cls_center.copy_(updated_center(self.cls_center, t_cls_logits, cfg.center_momentum))
                if has_mask:  # centred on the masked patches' teacher outputs, as DINOv2 does
                    self.patch_center.copy_(
                        updated_center(
                            self.patch_center.view(1, -1), t_patch_logits, cfg.center_momentum
                        ).view_as(self.patch_center)
                    )
        parts["teacher_temp"] = temp
        return loss, parts, list(s_cls.view(b, 2, -1).unbind(1))


class SSLModel(nn.Module):
    """Model kind `ssl`: a Dinov2 tower trained by DINO + iBOT on images alone.

    Saved folder: `image_tower/` (HF Dinov2Model + processor: loads with TowerConfig(type="dinov2",
    path=...)), `ssl.safetensors` (heads, EMA teacher, centres, counter) and `ssl.json` (configs).
    """

    SUPPORTED_TOWERS = ("dinov2", "dinov2_registers")

    def __init__(self, tower: Tower, cfg: SSLConfig, grad_accum: int = 1, total_steps: int = 1):
        super().__init__()
        if tower.config.type not in self.SUPPORTED_TOWERS:
            raise ValueError(
                f"ssl needs a Dinov2-family tower (bool_masked_pos); got type {tower.config.type!r}"
            )
        self.image_tower = tower
        self.cfg = cfg
        self.distill = SelfDistillation(
            tower.model, tower.hidden_size, tower.num_prefix_tokens, cfg.distill, grad_accum, total_steps
        )

    def configure_schedule(self, grad_accum: int, total_steps: int) -> None:
        """Set by the stage: the schedules count optimiser steps, which depend on the stage's settings."""
        self.distill.configure_schedule(grad_accum, total_steps)

    def forward(
        self,
        global_views: torch.Tensor,
        local_views: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        **_: Any,
    ) -> SSLOutput:
        loss, parts, _ = self.distill(global_views, local_views, masks)
        return SSLOutput(loss, parts)

    # -- saving ---------------------------------------------------------------------------------------------

    def exported_tower_state(self) -> dict[str, torch.Tensor] | None:
        """The teacher's backbone weights when `export == "teacher"`, else None (the student as is)."""
        if self.cfg.export == "student":
            return None
        if self.cfg.export != "teacher":
            raise ValueError(f"export must be 'student' or 'teacher', got {self.cfg.export!r}")
        return self.distill.teacher.state_for("backbone")

    def save_pretrained(self, out_dir: str | Path) -> Path:
        return save_encoder(self, out_dir, "ssl", {"ssl": asdict(self.cfg)}, self.exported_tower_state())

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> SSLModel:
        model_dir = Path(model_dir)
        meta = read_meta(model_dir, "ssl")
        cfg = config_from_dict(SSLConfig, meta["ssl"], f"{model_dir}/ssl.json:ssl")
        tower = build_tower(TowerConfig(**{**meta["tower"], "path": str(model_dir / "image_tower")}))
        model = cls(tower, cfg)
        load_extra(model, model_dir, "ssl")
        return model


# --------------------------------------------------------------------------------------------------------
# Saving helpers shared by ssl / tips / cloc
# --------------------------------------------------------------------------------------------------------


def tower_meta(tower: Tower) -> dict[str, Any]:
    """How to rebuild the tower's reader from its saved folder (type, layer, features), never the path."""
    cfg = asdict(tower.config)
    cfg.pop("path", None)
    cfg.pop("config", None)
    return cfg


def save_encoder(
    model: nn.Module,
    out_dir: str | Path,
    kind: str,
    meta: dict[str, Any],
    tower_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `image_tower/` (HF), `<kind>.safetensors` (everything else) and `<kind>.json` atomically.

    Written to a temporary sibling and renamed, so a crash never leaves a half-written model folder.
    `tower_state` replaces the tower's weights in `image_tower/` (an EMA teacher export).
    """
    from mllm.model import atomic_dir

    with atomic_dir(out_dir) as tmp:
        tower: Tower = model.image_tower
        if tower_state is not None:
            backup = {k: v.detach().clone() for k, v in tower.model.state_dict().items()}
            tower.model.load_state_dict(
                {**backup, **{k: v.to(backup[k].dtype) for k, v in tower_state.items()}}
            )
            try:
                tower.save_pretrained(tmp / "image_tower")
            finally:
                tower.model.load_state_dict(backup)
        else:
            tower.save_pretrained(tmp / "image_tower")
        rest = {
            k: v.detach().cpu().contiguous()
            for k, v in model.state_dict().items()
            if not k.startswith("image_tower.")
        }
        save_file(rest, str(tmp / f"{kind}.safetensors"))
        (tmp / f"{kind}.json").write_text(
            json.dumps({"kind": kind, "tower": tower_meta(tower), **meta}, indent=1)
        )
    return Path(out_dir)


def read_meta(model_dir: Path, kind: str) -> dict[str, Any]:
    path = model_dir / f"{kind}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no {kind}.json; not a saved {kind} model")
    meta = json.loads(path.read_text())
    if meta.get("kind") != kind:
        raise ValueError(f"{path}: kind is {meta.get('kind')!r}, expected {kind!r}")
    return meta


def load_extra(model: nn.Module, model_dir: Path, kind: str) -> None:
    """Load `<kind>.safetensors` (all non-tower state); a missing or unexpected key is an error naming it."""
    path = model_dir / f"{kind}.safetensors"
    state = load_file(str(path))
    own = {k for k in model.state_dict() if not k.startswith("image_tower.")}
    missing, extra = own - set(state), set(state) - own
    if missing or extra:
        raise ValueError(f"{path}: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    model.load_state_dict(state, strict=False)


def is_saved(model_dir: str | Path, kind: str) -> bool:
    d = Path(model_dir)
    return (d / f"{kind}.json").is_file() and (d / "image_tower" / "config.json").is_file()


# --------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------


class ImageViewsDataset(Dataset):
    """Any JSONL with an `image` field per line (GeoWorld scenes/captions/regions) -> augmented views.

    Randomness comes from the global torch RNG in the loading process, which the engine seeds and
    restores on resume; with `num_workers > 0` each worker is seeded by torch's DataLoader.
    """

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None,
        augment: Augmenter,
        grid: tuple[int, int],
        distill: DistillConfig,
        skip_bad_samples: bool = False,
    ):
        from mllm.data.geoworld.files import read_jsonl

        self.path = Path(path)
        self.root = Path(image_root) if image_root is not None else self.path.parent
        self.rows = read_jsonl(self.path)
        for i, row in enumerate(self.rows):
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                raise ValueError(f"{self.path} line {i + 1}: expected an object with a string 'image' field")
        self.augment, self.grid, self.distill, self.skip = augment, grid, distill, skip_bad_samples

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, i: int) -> tuple[str, Any]:
        """(sample id, PIL image) or (sample id, Skip) for an unreadable image under skip_bad_samples."""
        from mllm.data.conversations import Skip
        from mllm.data.images import ImageError, load_image, resolve_image

        row = self.rows[i]
        name = f"{self.path} line {i + 1} (id {row.get('id')!r})"
        try:
            image = load_image(resolve_image(self.root, row["image"]))
        except ImageError as e:
            if self.skip:
                return str(row.get("id", i)), Skip(name, f"{name}: {e}")
            raise ImageError(f"{name}: {e}") from e
        return str(row.get("id", i)), image

    def views(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.augment(image)
        out["masks"] = sample_masks(2, self.grid, self.distill.mask_prob, self.distill.mask_ratio)
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        from mllm.data.conversations import Skip

        ident, image = self.load(i)
        if isinstance(image, Skip):
            return {"skip": image}
        return {"id": ident, **self.views(image_to_tensor(image))}


def collate_views(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack every tensor field; skipped samples are passed on for the engine to list."""
    skips = [it["skip"] for it in items if "skip" in it]
    items = [it for it in items if "skip" not in it]
    batch: dict[str, Any] = {"skips": skips, "ids": [it["id"] for it in items]}
    if items:
        for key, value in items[0].items():
            if isinstance(value, torch.Tensor):
                batch[key] = torch.stack([it[key] for it in items])
    return batch


# --------------------------------------------------------------------------------------------------------
# Model kind and stage task
# --------------------------------------------------------------------------------------------------------


def stage_optimizer_steps(stage: Any, n_samples: int) -> int:
    """Optimiser steps the engine will take for `stage` (the same arithmetic as Trainer.total_steps)."""
    from mllm.training import distributed as D

    if stage.max_steps is not None:
        return int(stage.max_steps)
    per_epoch = -(-n_samples // (stage.batch_size * D.world_size()))
    return max(1, math.ceil(stage.epochs * per_epoch / stage.grad_accum))


def augmenter_for(tower: Tower, cfg: AugmentConfig) -> Augmenter:
    """Views at the tower's input size, normalised with the tower processor's own mean and std."""
    return Augmenter(cfg, tower.image_size, tower.processor.image_mean, tower.processor.image_std)


def build_ssl_model(cfg: Any, run_dir: Path, corpus_files: Sequence[Path], seed: int) -> SSLModel:
    """Model kind `ssl`: `model.tower` (type dinov2 / dinov2_registers) + `model.encoder` (SSLConfig)."""
    from mllm.training.engine import seed_everything

    if cfg.init_from:
        return SSLModel.from_pretrained(cfg.init_from)
    ssl_cfg = config_from_dict(SSLConfig, cfg.encoder, "model.encoder")
    seed_everything(seed)
    return SSLModel(build_tower(cfg.tower), ssl_cfg)


def ssl_task(model: SSLModel, stage: Any, template: str):
    """Stage kind `ssl`: data.json = any GeoWorld JSONL with an `image` field (captions/scenes); no text."""
    if not stage.data.json:
        raise ValueError(
            f"stage {stage.name!r}: data.json (a JSONL with an 'image' field per line) is not set"
        )
    if not isinstance(model, SSLModel):
        raise ValueError(
            f"stage {stage.name!r} is an ssl stage but the model is a {type(model).__name__}; "
            "set model.kind: ssl"
        )
    ds = ImageViewsDataset(
        stage.data.json,
        stage.data.images,
        augmenter_for(model.image_tower, model.cfg.augment),
        model.image_tower.grid,
        model.cfg.distill,
        stage.data.skip_bad_samples,
    )
    model.configure_schedule(stage.grad_accum, stage_optimizer_steps(stage, len(ds)))
    return model, ds, collate_views
