"""A GeoGLIP-style geometric encoder (SVE-Math): a small multi-scale conv backbone, an FPN pyramid and
detection heads for shape boxes, junctions (polygon vertices) and boundaries (edges).

Tiny equivalent of the paper's Swin-T + FPN (P3–P7, 256 channels): four conv stages at strides
4, 8, 16, 32 and a `fpn_dim`-wide pyramid over them (at 64 px: 16x16, 8x8, 4x4, 2x2 maps). As in the
paper, the finest level is enhanced for the junction/boundary heads by attention whose queries come from
the next-finer-but-one level (paper: P4) and whose keys/values come from the second-coarsest (paper: P6);
the result is upsampled and added to the finest map (paper: P3 -> P3').

Heads (CenterNet-style, anchor-free) on the enhanced finest map (stride 4):
- box: per-class centre heat-map, box size (log pixels) and sub-cell centre offset;
- junction: a heat-map at stride 2 (vertices of small shapes are 1-2 cells apart at stride 4);
- boundary: an edge map at stride 2.
Losses: CenterNet's penalty-reduced focal loss on both heat-maps, L1 on size/offset at the centres,
class-balanced BCE on the boundary map. The paper does not publish its losses; these are the standard
detection-style choices it points to.

For the MLLM (`router_levels`) only the pyramid is computed, coarse to fine, the enhanced map last —
the tiny counterpart of SVE-Math's (P7, P6, P5, P3').

Preprocessing is the encoder's own: shortest edge to `image_size` (bicubic), centre crop, [0, 1], then
normalise. `crop_params` exposes the same geometry so targets can follow the pixels exactly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from encoders.common import meta_body, read_meta, write_meta

__all__ = [
    "GEO_CLASSES",
    "box_ap",
    "point_recall",
    "GeoConfig",
    "GeoDetector",
    "GeoEncoder",
    "GeoOutput",
    "crop_params",
    "decode_boxes",
    "decode_points",
    "geo_losses",
    "to_canonical",
]

# Box classes: GeoWorld's primitives, the triangle of a math figure, and a vertex label ("A").
GEO_CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "rectangle",
    "star",
    "arrow",
    "pentagon",
    "hexagon",
    "figure",
    "label",
)
CONFIG_NAME = "geo_config.json"  # the folder's meta file: kind `geo`, format_version, the GeoConfig fields
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


@dataclass
class GeoConfig:
    """Architecture and preprocessing of the geometric encoder (plain data: it round-trips through YAML)."""

    image_size: int = 64
    channels: list[int] = field(default_factory=lambda: [24, 48, 64, 96])  # strides 4, 8, 16, 32
    fpn_dim: int = 48
    attn_heads: int = 4
    classes: list[str] = field(default_factory=lambda: list(GEO_CLASSES))
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    @property
    def strides(self) -> list[int]:
        return [4 * 2**i for i in range(len(self.channels))]


@dataclass
class GeoOutput:
    levels: list[torch.Tensor]  # FPN maps fine -> coarse, the finest already enhanced (P3')
    box_heat: torch.Tensor | None = None  # [B, C, H/4, W/4] logits
    box_size: torch.Tensor | None = None  # [B, 2, H/4, W/4] log(w), log(h) in pixels
    box_offset: torch.Tensor | None = None  # [B, 2, H/4, W/4] sub-cell centre offset in cells
    junction: torch.Tensor | None = None  # [B, 1, H/2, W/2] logits
    boundary: torch.Tensor | None = None  # [B, 1, H/2, W/2] logits


def _norm(c: int) -> nn.GroupNorm:
    """GroupNorm, not BatchNorm: statistics must not depend on the batch (tiny batches, frozen use)."""
    groups = next(g for g in (8, 4, 2, 1) if c % g == 0)
    return nn.GroupNorm(groups, c)


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), _norm(c_out), nn.GELU())


class _ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, 1, 1, bias=False),
            _norm(c),
            nn.GELU(),
            nn.Conv2d(c, c, 3, 1, 1, bias=False),
            _norm(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.body(x))


class _Backbone(nn.Module):
    """Stem to stride 4, then one residual stage per level, each halving the resolution."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        c0 = channels[0]
        self.stem = nn.Sequential(_conv(3, c0 // 2, 2), _conv(c0 // 2, c0, 2))
        stages = [nn.Sequential(_ResBlock(c0))]
        for c_prev, c in zip(channels[:-1], channels[1:]):
            stages.append(nn.Sequential(_conv(c_prev, c, 2), _ResBlock(c)))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


class _FPN(nn.Module):
    """Lateral 1x1 convs, top-down nearest upsampling and addition, a 3x3 conv per output level."""

    def __init__(self, channels: Sequence[int], dim: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList([nn.Conv2d(c, dim, 1) for c in channels])
        self.output = nn.ModuleList([nn.Conv2d(dim, dim, 3, 1, 1) for _ in channels])

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 2, -1, -1):
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        return [conv(x) for conv, x in zip(self.output, lat)]


class _Enhance(nn.Module):
    """P3' = P3 + up(attn(query=P4, key/value=P6)) (tiny indices: finest+1 attends to coarsest-1)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.fuse = _conv(dim, dim)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        fine, query_map = levels[0], levels[1]
        kv_map = levels[-2] if len(levels) > 2 else levels[-1]
        b, d, h, w = query_map.shape
        q = self.norm_q(query_map.flatten(2).transpose(1, 2))
        kv = self.norm_kv(kv_map.flatten(2).transpose(1, 2))
        ctx, _ = self.attn(q, kv, kv, need_weights=False)
        ctx = query_map + ctx.transpose(1, 2).reshape(b, d, h, w)
        return self.fuse(
            fine + F.interpolate(ctx, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        )


def _head(dim: int, out: int, bias: float = 0.0) -> nn.Sequential:
    head = nn.Sequential(_conv(dim, dim), nn.Conv2d(dim, out, 1))
    nn.init.constant_(head[-1].bias, bias)
    return head


class GeoEncoder(nn.Module):
    """Backbone + FPN + enhancement + heads. `forward(pixels, heads=False)` is what the MLLM runs."""

    def __init__(self, config: GeoConfig) -> None:
        super().__init__()
        if len(config.channels) < 3:
            raise ValueError(f"GeoEncoder needs at least 3 pyramid levels, got channels={config.channels}")
        if config.fpn_dim % config.attn_heads:
            raise ValueError(f"fpn_dim {config.fpn_dim} is not divisible by attn_heads {config.attn_heads}")
        if config.image_size % config.strides[-1]:
            raise ValueError(
                f"image_size {config.image_size} is not a multiple of the coarsest stride "
                f"{config.strides[-1]}"
            )
        self.config = config
        d = config.fpn_dim
        self.backbone = _Backbone(config.channels)
        self.fpn = _FPN(config.channels, d)
        self.enhance = _Enhance(d, config.attn_heads)
        prior = -2.19  # sigmoid = 0.1: CenterNet's focal-loss start, heat-maps are nearly all background
        self.box_heat = _head(d, len(config.classes), prior)
        self.box_size = _head(d, 2)
        self.box_offset = _head(d, 2)
        self.point_up = nn.Sequential(nn.ConvTranspose2d(d, d, 2, 2), _norm(d), nn.GELU())
        self.junction = _head(d, 1, prior)
        self.boundary = _head(d, 1)

    @property
    def num_levels(self) -> int:
        return len(self.config.channels)

    @property
    def level_dim(self) -> int:
        return self.config.fpn_dim

    def pyramid(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """FPN levels fine -> coarse with the finest replaced by its enhanced version."""
        levels = self.fpn(self.backbone(pixel_values))
        return [self.enhance(levels), *levels[1:]]

    def router_levels(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The levels the feature router reads, coarse to fine, enhanced finest last (paper: P7, P6, P5, P3')."""
        levels = self.pyramid(pixel_values)
        return [*levels[1:][::-1], levels[0]]

    def forward(self, pixel_values: torch.Tensor, heads: bool = True) -> GeoOutput:
        levels = self.pyramid(pixel_values)
        if not heads:
            return GeoOutput(levels)
        fine = levels[0]
        up = self.point_up(fine)
        return GeoOutput(
            levels,
            self.box_heat(fine),
            self.box_size(fine),
            self.box_offset(fine),
            self.junction(up),
            self.boundary(up),
        )

    # -- preprocessing --------------------------------------------------------------------------------
    def normalise(self, pixels01: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> this encoder's input (resized to image_size if needed, normalised)."""
        size = self.config.image_size
        if pixels01.shape[-2:] != (size, size):
            pixels01 = F.interpolate(
                pixels01, size=(size, size), mode="bicubic", align_corners=False, antialias=True
            ).clamp(0, 1)
        mean = torch.tensor(self.config.image_mean, dtype=pixels01.dtype, device=pixels01.device)
        std = torch.tensor(self.config.image_std, dtype=pixels01.dtype, device=pixels01.device)
        return (pixels01 - mean[:, None, None]) / std[:, None, None]

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.normalise(torch.stack([to_canonical(im, self.config.image_size) for im in images]))

    # -- persistence ----------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        write_meta(out / CONFIG_NAME, "geo", FORMAT_VERSION, asdict(self.config))
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(out / WEIGHTS_NAME)
        )

    @staticmethod
    def read_config(directory: str | os.PathLike[str]) -> GeoConfig:
        """The architecture of a saved encoder, from its checked meta file (no weights read)."""
        path = Path(directory)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{path}: not a geometric-encoder folder (no {CONFIG_NAME})")
        return GeoConfig(**meta_body(read_meta(path / CONFIG_NAME, "geo", FORMAT_VERSION)))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> GeoEncoder:
        path = Path(directory)
        model = cls(cls.read_config(path))
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        return model


def crop_params(width: int, height: int, size: int) -> tuple[float, float, float]:
    """(scale, left, top): shortest edge -> `size`, centre crop; x_out = x * scale - left."""
    scale = size / min(width, height)
    left = (width * scale - size) / 2
    top = (height * scale - size) / 2
    return scale, left, top


def to_canonical(image: Image.Image, size: int) -> torch.Tensor:
    """A PIL image -> [3, size, size] float in [0, 1]: shortest edge to `size` (bicubic), centre crop."""
    rgb = image.convert("RGB")
    w, h = rgb.size
    scale, left, top = crop_params(w, h, size)
    rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
    if (rw, rh) != (w, h):
        rgb = rgb.resize((rw, rh), Image.Resampling.BICUBIC)
    x0, y0 = (rw - size) // 2, (rh - size) // 2
    rgb = rgb.crop((x0, y0, x0 + size, y0 + size))
    arr = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------- losses
def focal_heatmap_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, beta: float = 4.0
) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of peaks (1 at a centre)."""
    p = torch.sigmoid(logits.float()).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    neg = 1.0 - pos
    pos_loss = -torch.log(p) * (1 - p) ** alpha * pos
    neg_loss = -torch.log(1 - p) * p**alpha * (1 - target) ** beta * neg
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


def geo_losses(out: GeoOutput, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The four training losses from dense targets (see mllm.data.geoworld.geo_targets)."""
    heat = focal_heatmap_loss(out.box_heat, targets["box_heat"])
    mask = targets["box_mask"].unsqueeze(1).float()  # [B, 1, h, w] 1 at each box centre
    n = mask.sum().clamp(min=1.0)
    size = (F.l1_loss(out.box_size.float(), targets["box_size"], reduction="none") * mask).sum() / n
    offset = (F.l1_loss(out.box_offset.float(), targets["box_offset"], reduction="none") * mask).sum() / n
    junction = focal_heatmap_loss(out.junction, targets["junction"])
    edge_t = targets["boundary"]
    pos = edge_t.sum().clamp(min=1.0)
    pos_weight = ((edge_t.numel() - pos) / pos).clamp(max=50.0)
    boundary = F.binary_cross_entropy_with_logits(out.boundary.float(), edge_t, pos_weight=pos_weight)
    return {
        "box_heat": heat,
        "box_size": 0.1 * size,
        "box_offset": offset,
        "junction": junction,
        "boundary": boundary,
    }


@dataclass
class GeoDetectorOutput:
    loss: torch.Tensor
    stats: dict[str, torch.Tensor]  # each part of the loss, detached; logged by the training engine


class GeoDetector(nn.Module):
    """The training wrapper the `geoglip` stage steps: `geo.*` trains, the loss is the sum of the parts."""

    def __init__(self, geo: GeoEncoder) -> None:
        super().__init__()
        self.geo = geo

    def forward(self, pixel_values: torch.Tensor, **targets: torch.Tensor) -> GeoDetectorOutput:
        out = self.geo(pixel_values.to(next(self.geo.parameters()).dtype))
        parts = geo_losses(out, targets)
        return GeoDetectorOutput(sum(parts.values()), {k: v.detach() for k, v in parts.items()})


# ---------------------------------------------------------------------------------------------- decoding
def _peaks(heat: torch.Tensor, threshold: float, k: int) -> list[tuple[float, int, int, int]]:
    """(score, channel, y, x) of 3x3 local maxima above `threshold`, best first, at most k; heat [C, h, w]."""
    keep = heat == F.max_pool2d(heat[None], 3, 1, 1)[0]
    scores = (heat * keep).flatten()
    top = torch.topk(scores, min(k, scores.numel()))
    h, w = heat.shape[-2:]
    out = []
    for s, idx in zip(top.values.tolist(), top.indices.tolist()):
        if s < threshold:
            break
        c, rem = divmod(idx, h * w)
        out.append((s, c, rem // w, rem % w))
    return out


def decode_boxes(
    out: GeoOutput, index: int, stride: int = 4, threshold: float = 0.05, k: int = 50
) -> list[tuple[list[float], int, float]]:
    """([x1, y1, x2, y2] in input pixels, class, score) for image `index` of a batch."""
    heat = torch.sigmoid(out.box_heat[index].float())
    size = out.box_size[index].float().exp()
    offset = out.box_offset[index].float()
    boxes = []
    for s, c, y, x in _peaks(heat, threshold, k):
        cx, cy = (x + offset[0, y, x].item()) * stride, (y + offset[1, y, x].item()) * stride
        bw, bh = size[0, y, x].item(), size[1, y, x].item()
        boxes.append(([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], c, s))
    return boxes


def decode_points(
    out: GeoOutput, index: int, stride: int = 2, threshold: float = 0.3, k: int = 100
) -> list[tuple[float, float, float]]:
    """(x, y, score) of junction peaks in input pixels (cell centres)."""
    heat = torch.sigmoid(out.junction[index].float())
    return [((x + 0.5) * stride, (y + 0.5) * stride, s) for s, _, y, x in _peaks(heat, threshold, k)]


# ---------------------------------------------------------------------------------------------- metrics
def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_ap(
    preds: list[list[tuple[list[float], int, float]]],
    gts: list[tuple[list[list[float]], list[int]]],
    num_classes: int,
    iou: float = 0.5,
) -> dict[str, float]:
    """VOC-style all-point AP per class at `iou` over a set of images, and their mean over classes with
    ground truth. preds[i]: (box, class, score) of image i; gts[i]: (boxes, classes) of image i."""
    aps: dict[str, float] = {}
    for c in range(num_classes):
        n_gt = sum(sum(1 for k in cls if k == c) for _, cls in gts)
        if n_gt == 0:
            continue
        dets = sorted(
            ((s, i, b) for i, p in enumerate(preds) for b, k, s in p if k == c), key=lambda t: -t[0]
        )
        used: dict[int, set[int]] = {}
        tp = []
        for _, i, b in dets:
            boxes, cls = gts[i]
            cands = [(j, _iou(b, g)) for j, (g, k) in enumerate(zip(boxes, cls)) if k == c]
            best = max(cands, key=lambda t: t[1], default=(None, 0.0))
            hit = best[0] is not None and best[1] >= iou and best[0] not in used.setdefault(i, set())
            if hit:
                used[i].add(best[0])
            tp.append(1.0 if hit else 0.0)
        tps = np.cumsum(tp) if tp else np.zeros(0)
        recall = tps / n_gt
        precision = tps / np.arange(1, len(tp) + 1) if tp else np.zeros(0)
        # all-point interpolation: area under the monotone precision envelope
        mrec = np.concatenate([[0.0], recall, [1.0]])
        mpre = np.concatenate([[0.0], precision, [0.0]])
        for k in range(len(mpre) - 2, -1, -1):
            mpre[k] = max(mpre[k], mpre[k + 1])
        idx = np.where(mrec[1:] != mrec[:-1])[0]
        aps[str(c)] = float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))
    return {
        "mAP": float(np.mean(list(aps.values()))) if aps else 0.0,
        **{f"AP_{k}": v for k, v in aps.items()},
    }


def point_recall(
    preds: list[list[tuple[float, float, float]]], gts: list[list[tuple[float, float]]], tolerance: float
) -> dict[str, float]:
    """Junction recall (share of true vertices with a predicted peak within `tolerance` px) and precision
    (share of predicted peaks within `tolerance` of some true vertex), over a set of images."""
    hit_gt = n_gt = hit_pred = n_pred = 0
    for p, g in zip(preds, gts):
        n_gt += len(g)
        n_pred += len(p)
        for gx, gy in g:
            hit_gt += any((px - gx) ** 2 + (py - gy) ** 2 <= tolerance**2 for px, py, _ in p)
        for px, py, _ in p:
            hit_pred += any((px - gx) ** 2 + (py - gy) ** 2 <= tolerance**2 for gx, gy in g)
    return {"recall": hit_gt / max(n_gt, 1), "precision": hit_pred / max(n_pred, 1), "n_gt": float(n_gt)}
