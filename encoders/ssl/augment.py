"""DINO's views in torch only: random resized crop, flip, colour jitter (no hue: colour is a label in
GeoWorld), and BEiT/iBOT blockwise patch masks for the masked-image loss."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from encoders.ssl.config import AugmentConfig
from encoders.towers import Tower


def image_to_tensor(image: Any) -> torch.Tensor:
    """PIL RGB image -> float [3, H, W] in [0, 1]."""
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
    top, left, h, w = random_crop_box(image.shape[1], image.shape[2], scale, ratio, gen)
    crop = image[:, top : top + h, left : left + w].unsqueeze(0)
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def random_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    gen: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """The box (top, left, h, w) `random_resized_crop` cuts; PixPro keeps it to match pixels across views."""
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
    return box


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


def augmenter_for(tower: Tower, cfg: AugmentConfig) -> Augmenter:
    """Views at the tower's input size, normalised with the tower processor's own mean and std."""
    return Augmenter(cfg, tower.image_size, tower.processor.image_mean, tower.processor.image_std)
