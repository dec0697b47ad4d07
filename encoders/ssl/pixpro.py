"""PixPro (Xie et al. 2021, "Propagate Yourself: Exploring Pixel-Level Consistency for Unsupervised Visual
Representation Learning") as a dense objective of the self-supervised tower (model kind `ssl`,
`objective: pixpro`).

Two global views of an image, each cut with a known box. Per patch token: x = projector(token) (student),
x' = the EMA teacher's projector(teacher token) (no gradient). The pixel propagation module smooths the
student: y_i = Σ_j max(cos(x_i, x_j), 0)^γ · g(x_j) over the view's own patches (g: one linear layer, the
paper's best). Patches i of view A and j of view B are a positive pair when their centres, mapped back to the
original image, lie closer than T times the larger of the two views' patch-bin diagonals (T = 0.7).
L = - mean_{(i,j) positive} cos(y^A_i, x'^B_j) - mean_{(i,j) positive} cos(y^B_j, x'^A_i), per image, averaged
over the images with at least one positive pair (the official code's per-image masked mean; its instance
branch, PixContrast and the FPN are not here). The teacher follows the student after each optimiser step,
momentum m = 1 - (1 - m0)(cos(π k / K) + 1) / 2 over the stage's K steps (m0 = 0.99 in the paper).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.common import ConfigError
from encoders.ssl.augment import color_jitter, random_crop_box
from encoders.ssl.distill import EMATeacher
from encoders.ssl.losses import cosine_ramp
from encoders.ssl.options import WHERE, check_count, check_positive


@dataclass
class PixProOptions:
    """`objective_args` of `objective: pixpro` (paper: γ 2, T 0.7, m0 0.99, projector 2048 -> 256)."""

    gamma: float = 2.0
    threshold: float = 0.7
    momentum: float = 0.99
    head_hidden: int = 256
    out_dim: int = 64

    def __post_init__(self) -> None:
        check_positive("gamma", self.gamma)
        check_positive("threshold", self.threshold)
        m = self.momentum
        if not isinstance(m, (int, float)) or isinstance(m, bool) or not 0.0 <= m <= 1.0:
            raise ConfigError(f"{WHERE}.momentum must be a number in [0, 1], got {m!r}")
        check_count("head_hidden", self.head_hidden, 1)
        check_count("out_dim", self.out_dim, 1)


# ---------------------------------------------------------------- geometry
def crop_view(
    image: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip_prob: float,
    gen: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random resized crop (and flip) of image [3, H, W] at size x size, and where it came from: the box
    (x_left, y_top, x_right, y_bottom) in the original image's [0, 1] coordinates of the view's left, top,
    right and bottom edges (a flipped view has x_left > x_right), so a view pixel maps back linearly."""
    _, height, width = image.shape
    top, left, h, w = random_crop_box(height, width, scale, ratio, gen)
    crop = image[:, top : top + h, left : left + w].unsqueeze(0)
    view = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    box = torch.tensor([left / width, top / height, (left + w) / width, (top + h) / height])
    if float(torch.rand((), generator=gen)) < flip_prob:
        view = view.flip(-1)
        box = box[[2, 1, 0, 3]]
    return view, box


def patch_centres(box: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres [gh*gw, 2] (x, y) of a view's patches in original-image coordinates (row-major, as the
    tower's tokens), and the diagonal length of one patch bin there."""
    gh, gw = grid
    x0, y0, x1, y1 = box.unbind(-1)
    cx = x0 + (torch.arange(gw, dtype=box.dtype) + 0.5) / gw * (x1 - x0)
    cy = y0 + (torch.arange(gh, dtype=box.dtype) + 0.5) / gh * (y1 - y0)
    centres = torch.stack([cx.repeat(gh), cy.repeat_interleave(gw)], -1)
    diag = torch.sqrt(((x1 - x0) / gw) ** 2 + ((y1 - y0) / gh) ** 2)
    return centres, diag


def positive_pairs(
    box_a: torch.Tensor, box_b: torch.Tensor, grid: tuple[int, int], threshold: float
) -> torch.Tensor:
    """bool [N, N]: patch i of view A and patch j of view B are closer than threshold x the larger bin
    diagonal in the original image."""
    ca, da = patch_centres(box_a, grid)
    cb, db = patch_centres(box_b, grid)
    dist = torch.cdist(ca[None], cb[None])[0]
    return dist < threshold * torch.maximum(da, db)


# ---------------------------------------------------------------- loss
def propagate(x: torch.Tensor, gx: torch.Tensor, gamma: float) -> torch.Tensor:
    """The pixel propagation module: y_i = Σ_j max(cos(x_i, x_j), 0)^γ g(x_j); x, gx [B, N, C]."""
    xn = F.normalize(x, dim=-1)
    sim = (xn @ xn.transpose(1, 2)).clamp_min(0).pow(gamma)
    return sim @ gx


def pixpro_loss(
    y_a: torch.Tensor, y_b: torch.Tensor, t_a: torch.Tensor, t_b: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """y_*: propagated student features [B, N, C]; t_*: teacher features [B, N, C]; pos [B, N, N] (A's patch
    i, B's patch j). -(masked mean cos(y_A_i, t_B_j) + masked mean cos(y_B_j, t_A_i)) per image, averaged over
    images with a positive pair (0 with a gradient path if none has one)."""
    ya, yb = F.normalize(y_a.float(), dim=-1), F.normalize(y_b.float(), dim=-1)
    ta, tb = F.normalize(t_a.float(), dim=-1), F.normalize(t_b.float(), dim=-1)
    posf = pos.float()
    count = posf.sum((1, 2))
    has = count > 0
    if not bool(has.any()):
        return y_a.sum() * 0.0
    ab = ((ya @ tb.transpose(1, 2)) * posf).sum((1, 2))
    ba = ((ta @ yb.transpose(1, 2)) * posf).sum((1, 2))  # [i, j] = cos(t_A_i, y_B_j)
    return -((ab[has] + ba[has]) / count[has]).mean()


class PixelProjector(nn.Module):
    """Per-token Linear -> GELU -> Linear (the paper's 1x1-conv projector, without BatchNorm)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


Tokens = Callable[[torch.Tensor], torch.Tensor]  # pixels [N, 3, H, W] -> patch tokens [N, P, hidden]


class PixProObjective(nn.Module):
    """Projector, propagation transform g and the EMA teacher of tower + projector (fp32 buffers run
    through the student's own modules, `encoders.ssl.distill.EMATeacher`)."""

    needs = ("view_boxes",)
    dense = True  # takes patch tokens, not the CLS token

    def __init__(self, opts: PixProOptions, tower: Any):
        super().__init__()
        self.opts, self.n_prefix = opts, tower.num_prefix_tokens
        self.grid = (int(tower.grid[0]), int(tower.grid[1]))
        self.projector = PixelProjector(tower.hidden_size, opts.head_hidden, opts.out_dim)
        self.transform = nn.Linear(opts.out_dim, opts.out_dim)  # g
        self.teacher = EMATeacher({"backbone": tower.model, "projector": self.projector})
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.total_steps = 1

    def configure_schedule(self, grad_accum: int, total_steps: int) -> None:
        self.total_steps = max(1, int(total_steps))
        self.steps.zero_()

    @torch.no_grad()
    def after_step(self) -> None:
        """The teacher follows the student once per optimiser step (called by the model's after_step)."""
        m = cosine_ramp(self.opts.momentum, 1.0, int(self.steps), self.total_steps)
        self.teacher.update(m)
        self.steps += 1

    def forward(
        self,
        tokens: Tokens,
        global_views: torch.Tensor,
        local_views: torch.Tensor | None = None,
        view_boxes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if view_boxes is None:
            raise ValueError("objective pixpro needs view_boxes in the batch (the global views' crop boxes)")
        b, g = global_views.shape[:2]
        if g != 2:
            raise ValueError(f"pixpro compares 2 global views per image, got {g}")
        flat = global_views.flatten(0, 1)
        x = self.projector(tokens(flat))  # [B*2, N, C]
        y = propagate(x, self.transform(x), self.opts.gamma).view(b, 2, *x.shape[1:])
        with torch.no_grad():
            hidden = self.teacher.run("backbone", pixel_values=flat.float()).last_hidden_state
            t = self.teacher.run("projector", hidden[:, self.n_prefix :]).view(b, 2, *x.shape[1:])
        pos = torch.stack(
            [
                positive_pairs(view_boxes[i, 0], view_boxes[i, 1], self.grid, self.opts.threshold)
                for i in range(b)
            ]
        ).to(x.device)
        loss = pixpro_loss(y[:, 0], y[:, 1], t[:, 0], t[:, 1], pos)
        return loss, {"pixpro": loss.detach(), "positive_pairs": pos.float().sum((1, 2)).mean()}


def pixpro_views(
    image: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip_prob: float,
    jitter_prob: float,
    jitter: float,
    mean: torch.Tensor,
    std: torch.Tensor,
    gen: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Two global views with their boxes (the Augmenter's crop, flip and jitter, boxes kept)."""
    views, boxes = [], []
    for _ in range(2):
        v, box = crop_view(image, size, scale, ratio, flip_prob, gen)
        if float(torch.rand((), generator=gen)) < jitter_prob:
            v = color_jitter(v, jitter, gen)
        views.append((v - mean) / std)
        boxes.append(box)
    return {"global_views": torch.stack(views), "view_boxes": torch.stack(boxes)}
