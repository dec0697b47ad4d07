"""CLOC: contrastive localized language-image pretraining (region-text loss + grounding on a CLIP pair).

CLIP aligns whole images with whole captions, so its tokens know little about *where* things are; an
MLLM asked about "the small blue triangle" then has to find it alone. CLOC adds, on the same towers:

- the **Prompter**: the box (x1, y1, x2, y2), normalised, sinusoidally encoded and projected to one
  token, prepended to the image tower's tokens before pooling; one single-head transformer layer of the
  tower's width; average pool; a projection into the shared space -> a region embedding;
- **L_CLOC**: symmetric InfoNCE between region embeddings and their phrase embeddings (the text tower),
  M regions sampled per image, negatives across the batch, and negatives whose phrase is a near
  duplicate of the positive's (text-text cosine > 0.9) dropped, since "the red circle" in two images
  is not a negative of itself;
- **L_ground**: the same Prompter prompted with the phrase's text embedding, a 2-layer GELU MLP to a
  sigmoid box, MSE on normalised coordinates;
- **total** = L_CLIP + lambda * s * (L_CLOC + L_ground), s = the share of images in the batch with regions.

`ClocModel` is a `ContrastiveModel` (same towers, heads, objective registry, save layout) plus the
Prompter, so its `image_tower/` loads into a MultimodalLM like any contrastive tower, and a CLIP
checkpoint can seed it (`model.init_from`). Spec: ../shared/reference/methods.md, "CLOC".

This module is the model only: its data is `mllm.data.regions`, its builder and stage task
`mllm.families.cloc`, its evaluation `mllm.evaluation.regions` (`mllm probe regions`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from encoders.common import ConfigError, from_dict
from encoders.contrastive import (
    ContrastiveHeads,
    ContrastiveModel,
    EncoderConfig,
    extension_section,
    is_extension_dir,
)
from encoders.text_tower import TextTower
from encoders.towers import Tower

CLOC_WEIGHTS = "cloc.safetensors"


@dataclass
class ClocConfig:
    """`model.encoder.cloc` of a CLOC recipe (the rest of `model.encoder` is the contrastive pair's)."""

    regions_per_image: int = 4  # M: regions sampled per image per fetch (all of them when fewer)
    filter_threshold: float = (
        0.9  # drop negatives whose phrase embedding has cosine > this with the positive's
    )
    weight: float = 1.0  # lambda; the effective weight is lambda * (share of images with regions)
    box_dim: int = 128  # size of the sinusoidal box code (32 per coordinate)
    regions_file: str = "regions.jsonl"  # beside the stage's data.json (captions.jsonl), joined by id

    def __post_init__(self) -> None:
        if self.box_dim % 8:
            raise ConfigError(
                f"model.encoder.cloc.box_dim must be a multiple of 8 (sin+cos per coordinate), got {self.box_dim}"
            )
        if self.regions_per_image < 1:
            raise ConfigError("model.encoder.cloc.regions_per_image must be at least 1")


def cloc_config(raw: dict[str, Any] | None) -> ClocConfig:
    return from_dict(ClocConfig, raw or {}, "model.encoder.cloc")


@dataclass
class ClocEncoderConfig(EncoderConfig):
    """`model.encoder` of model kind `cloc`: the contrastive pair's settings plus `cloc:`."""

    cloc: ClocConfig = field(default_factory=ClocConfig)


# --------------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------------


def box_encoding(boxes: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sinusoidal code of normalised boxes [R, 4] -> [R, dim] (DETR's sine embedding per coordinate).

    Each coordinate x in [0, 1] gets dim/4 channels: sin and cos of 2*pi*x / T^(2k / (dim/4)), so nearby
    boxes get nearby codes at every scale and a linear layer can read positions and sizes off them.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [R, 4], got {tuple(boxes.shape)}")
    per = dim // 4
    if per * 4 != dim or per % 2:
        raise ValueError(f"dim must be a multiple of 8, got {dim}")
    k = torch.arange(per // 2, dtype=torch.float32, device=boxes.device)
    freq = temperature ** (2 * k / per)  # [per/2]
    angles = boxes.float().unsqueeze(-1) * (2 * math.pi) / freq  # [R, 4, per/2]
    code = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # [R, 4, per] (sin, cos interleaved)
    return code.flatten(1)


def negative_filter(text_emb: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool [R, R]: True where pair (i, j), i != j, is dropped as a negative (text cosine > threshold)."""
    t = F.normalize(text_emb.detach().float(), dim=-1)
    sim = t @ t.t()
    eye = torch.eye(len(t), dtype=torch.bool, device=t.device)
    return (sim > threshold) & ~eye


def region_info_nce(
    region: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over R (region, phrase) pairs with the near-duplicate negative filter.

    region, text: [R, E] L2-normalised. Returns (loss, share of off-diagonal pairs dropped: a 0-dim
    tensor, a statistic left on the device).
    """
    if region.shape != text.shape:
        raise ValueError(
            f"region {tuple(region.shape)} and text {tuple(text.shape)} embeddings differ in shape"
        )
    logits = scale * region.float() @ text.float().t()
    drop = negative_filter(text, threshold)
    logits = logits.masked_fill(drop, float("-inf"))
    target = torch.arange(len(region), device=region.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    n = len(region)
    dropped = drop.sum() / max(1, n * (n - 1))
    return loss, dropped


def combined_loss(
    clip: torch.Tensor, cloc: torch.Tensor, ground: torch.Tensor, share: float, weight: float
) -> torch.Tensor:
    """L_CLIP + lambda * s * (L_CLOC + L_ground), s = share of images with regions (0 -> plain CLIP)."""
    return clip + (weight * share) * (cloc + ground)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two [R, 4] (x1, y1, x2, y2) box tensors."""
    x1 = torch.maximum(a[:, 0], b[:, 0])
    y1 = torch.maximum(a[:, 1], b[:, 1])
    x2 = torch.minimum(a[:, 2], b[:, 2])
    y2 = torch.minimum(a[:, 3], b[:, 3])
    inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    area = lambda t: (t[:, 2] - t[:, 0]).clamp(min=0) * (t[:, 3] - t[:, 1]).clamp(min=0)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-9)


def ordered_box(box: torch.Tensor) -> torch.Tensor:
    """(min x, min y, max x, max y) of each predicted corner pair: a sigmoid head may swap them."""
    return torch.stack(
        [
            torch.minimum(box[:, 0], box[:, 2]),
            torch.minimum(box[:, 1], box[:, 3]),
            torch.maximum(box[:, 0], box[:, 2]),
            torch.maximum(box[:, 1], box[:, 3]),
        ],
        dim=1,
    )


# --------------------------------------------------------------------------------------------------------
# The Prompter and the grounding head
# --------------------------------------------------------------------------------------------------------


class Prompter(nn.Module):
    """One prompt token + the image tokens -> one single-head transformer layer -> average pool.

    The prompt is either a box (sinusoidal code -> linear) or a text embedding (linear); the pooled
    vector goes to `region_proj` (region embedding in the shared space) or to `ground_head` (a box).
    """

    def __init__(self, width: int, embed_dim: int, box_dim: int = 128):
        super().__init__()
        self.box_dim = box_dim
        self.box_prompt = nn.Linear(box_dim, width)
        self.text_prompt = nn.Linear(embed_dim, width)
        self.layer = nn.TransformerEncoderLayer(
            width,
            nhead=1,
            dim_feedforward=4 * width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.norm = nn.LayerNorm(width)
        self.region_proj = nn.Linear(width, embed_dim, bias=False)
        self.ground_head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 4))

    def pool(self, tokens: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """tokens [R, N, D] (pre-pool image tokens), prompt [R, D] -> pooled [R, D]."""
        x = torch.cat([prompt.unsqueeze(1).to(tokens.dtype), tokens], dim=1)
        return self.norm(self.layer(x)).mean(1)

    def region_embedding(self, tokens: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """L2-normalised region embeddings [R, E] for normalised boxes [R, 4]."""
        code = box_encoding(boxes, self.box_dim).to(self.box_prompt.weight.dtype)
        return F.normalize(self.region_proj(self.pool(tokens, self.box_prompt(code))), dim=-1)

    def ground(self, tokens: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Boxes [R, 4] in (0, 1), as the head emits them (corners may be swapped; see `ordered_box`)."""
        prompt = self.text_prompt(text_emb.to(self.text_prompt.weight.dtype))
        return torch.sigmoid(self.ground_head(self.pool(tokens, prompt)).float())


# --------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------


@dataclass
class ClocOutput:
    loss: torch.Tensor
    stats: dict[str, torch.Tensor | float]  # logged by the training engine (metrics.jsonl `stats`)


class ClocModel(ContrastiveModel):
    """A ContrastiveModel + Prompter, trained with CLIP + region-text + grounding (model kind `cloc`)."""

    def __init__(
        self,
        image_tower: Tower,
        text_tower: TextTower,
        cfg: EncoderConfig,
        heads: ContrastiveHeads | None = None,
        cloc: ClocConfig | None = None,
    ):
        super().__init__(image_tower, text_tower, cfg, heads)
        self.cloc_cfg = cloc or ClocConfig()
        if self.needs:
            raise ValueError(
                f"CLOC combines its losses with a global objective that needs no extra inputs; "
                f"{cfg.objective!r} needs {sorted(self.needs)}"
            )
        self.prompter = Prompter(image_tower.output_size, cfg.embed_dim, self.cloc_cfg.box_dim)

    @classmethod
    def from_contrastive(cls, base: ContrastiveModel, cloc: ClocConfig) -> ClocModel:
        """Wrap a (possibly trained) CLIP pair: CLOC training can start from a CLIP checkpoint."""
        return cls(base.image_tower, base.text_tower, base.cfg, base.heads, cloc)

    # -- encoding -------------------------------------------------------------------------------------------

    def image_pass(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global embedding [B, E] exactly as `encode_image`, pre-pool tokens [B, P + N, D], P the tower's
        prefix tokens: 1 for CLIP, 0 for SigLIP and conv towers) in one pass."""
        tower = self.image_tower
        hidden, pooled = tower.final_outputs(pixel_values)
        patches = hidden[:, tower.num_prefix_tokens :]
        if self.cfg.image_pool == "mean" or pooled is None:
            pooled = patches.mean(1)
        return F.normalize(self.heads.image_proj(pooled), dim=-1), hidden

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        region_input_ids: torch.Tensor | None = None,
        region_attention_mask: torch.Tensor | None = None,
        region_boxes: torch.Tensor | None = None,
        region_image: torch.Tensor | None = None,
        **_: Any,
    ) -> ClocOutput:
        img, tokens = self.image_pass(pixel_values)
        txt = self.encode_text(input_ids, attention_mask)
        scale = self.logit_scale()
        l_clip, stats = self.objective(img, txt, scale, self.logit_bias())
        stats = {f"clip_{k}": v for k, v in dict(stats or {}).items()}
        n_regions = 0 if region_boxes is None else int(region_boxes.shape[0])
        if n_regions == 0:
            zero = img.sum() * 0.0
            l_cloc, l_ground, share, dropped = zero, zero, 0.0, 0.0
        else:
            share = float(torch.unique(region_image).numel()) / img.shape[0]
            phrase = self.encode_text(region_input_ids, region_attention_mask)
            region_tokens = tokens[region_image]
            regions = self.prompter.region_embedding(region_tokens, region_boxes)
            l_cloc, dropped = region_info_nce(regions, phrase, scale, self.cloc_cfg.filter_threshold)
            pred = self.prompter.ground(region_tokens, phrase)
            l_ground = F.mse_loss(pred, region_boxes.float())
        loss = combined_loss(l_clip, l_cloc, l_ground, share, self.cloc_cfg.weight)
        stats.update(
            clip=l_clip.detach(),
            cloc=l_cloc.detach(),
            ground=l_ground.detach(),
            region_share=share,
            filtered=dropped,
            regions=n_regions,
        )
        return ClocOutput(loss, stats)

    # -- the public region API ------------------------------------------------------------------------------

    def _pixels(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return images
        return self.image_tower.preprocess(list(images))

    @torch.no_grad()
    def region_embeddings(
        self,
        images: Sequence[Image.Image] | torch.Tensor,
        boxes: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalised region embeddings [R, E]; box r is in image `image_index[r]` (default: r)."""
        _, tokens = self.image_pass(self._pixels(images))
        idx = torch.arange(len(boxes)) if image_index is None else image_index
        return self.prompter.region_embedding(tokens[idx.to(tokens.device)], boxes.to(tokens.device)).float()

    @torch.no_grad()
    def region_embedding(self, image: Image.Image, box: Sequence[float]) -> torch.Tensor:
        """The embedding [E] of one normalised box (x1, y1, x2, y2) of one image."""
        return self.region_embeddings([image], torch.tensor([list(box)], dtype=torch.float32))[0]

    @torch.no_grad()
    def ground_boxes(
        self,
        images: Sequence[Image.Image] | torch.Tensor,
        texts: Sequence[str],
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalised (x1, y1, x2, y2) boxes [R, 4] for text r in image `image_index[r]` (default: r)."""
        _, tokens = self.image_pass(self._pixels(images))
        text_emb = self.embed_texts(list(texts)).to(tokens.device)
        idx = torch.arange(len(texts)) if image_index is None else image_index
        return ordered_box(self.prompter.ground(tokens[idx.to(tokens.device)], text_emb)).float()

    @torch.no_grad()
    def ground(self, image: Image.Image, text: str) -> tuple[float, float, float, float]:
        """Where `text` is in `image`: a normalised (x1, y1, x2, y2) box."""
        box = self.ground_boxes([image], [text])[0].tolist()
        return (box[0], box[1], box[2], box[3])

    # -- persistence ----------------------------------------------------------------------------------------

    KIND = "cloc"

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "cloc": asdict(self.cloc_cfg)}

    def write_parts(self, folder: Path) -> None:
        """The ContrastiveModel files (contrastive.json of kind `cloc`, with the `cloc` section) +
        `cloc.safetensors` (Prompter)."""
        super().write_parts(folder)
        save_file(
            {k: v.detach().contiguous().cpu().float() for k, v in self.prompter.state_dict().items()},
            str(folder / CLOC_WEIGHTS),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ClocModel:
        model_dir = Path(model_dir)
        section = extension_section(model_dir, "cloc")
        base = ContrastiveModel.from_pretrained(model_dir)
        cfg = cloc_config(section)
        model = cls.from_contrastive(base, cfg)
        model.prompter.load_state_dict(load_file(str(model_dir / CLOC_WEIGHTS)))
        return model.eval()


def is_cloc_dir(path: str | Path) -> bool:
    return is_extension_dir(path, "cloc")
