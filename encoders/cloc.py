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
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from encoders.contrastive import ContrastiveHeads, ContrastiveModel, EncoderConfig
from encoders.text_tower import TextTower
from encoders.towers import Tower
from mllm.data.captions import CaptionCollator

CLOC_FILE = "cloc.json"
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


def cloc_config(raw: dict[str, Any] | None) -> ClocConfig:
    from mllm.config import ConfigError, from_dict

    cfg = from_dict(ClocConfig, raw or {}, "model.encoder.cloc")
    if cfg.box_dim % 8:
        raise ConfigError(
            f"model.encoder.cloc.box_dim must be a multiple of 8 (sin+cos per coordinate), got {cfg.box_dim}"
        )
    if cfg.regions_per_image < 1:
        raise ConfigError("model.encoder.cloc.regions_per_image must be at least 1")
    return cfg


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
) -> tuple[torch.Tensor, float]:
    """Symmetric InfoNCE over R (region, phrase) pairs with the near-duplicate negative filter.

    region, text: [R, E] L2-normalised. Returns (loss, share of off-diagonal pairs dropped).
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
    dropped = float(drop.sum()) / max(1, n * (n - 1))
    return loss, dropped


def combined_loss(
    clip: torch.Tensor, cloc: torch.Tensor, ground: torch.Tensor, share: float, weight: float
) -> torch.Tensor:
    """L_CLIP + lambda * s * (L_CLOC + L_ground), s = share of images with regions (0 -> plain CLIP)."""
    return clip + (weight * share) * (cloc + ground)


def sample_regions(n: int, m: int, generator: torch.Generator | None = None) -> list[int]:
    """Up to m of n region indices without replacement, in their original order."""
    if n <= m:
        return list(range(n))
    return sorted(torch.randperm(n, generator=generator)[:m].tolist())


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
    stats: dict[str, float]


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
            clip=float(l_clip.detach()),
            cloc=float(l_cloc.detach()),
            ground=float(l_ground.detach()),
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

    def write_parts(self, folder: Path) -> None:
        """The ContrastiveModel files + `cloc.safetensors` (Prompter) + `cloc.json`."""
        super().write_parts(folder)
        save_file(
            {k: v.detach().contiguous().cpu().float() for k, v in self.prompter.state_dict().items()},
            str(folder / CLOC_WEIGHTS),
        )
        (folder / CLOC_FILE).write_text(json.dumps({"format_version": 1, "cloc": asdict(self.cloc_cfg)}, indent=2))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ClocModel:
        model_dir = Path(model_dir)
        if not (model_dir / CLOC_FILE).is_file():
            raise FileNotFoundError(f"{model_dir}: not a CLOC model folder (no {CLOC_FILE})")
        base = ContrastiveModel.from_pretrained(model_dir)
        cfg = cloc_config(json.loads((model_dir / CLOC_FILE).read_text())["cloc"])
        model = cls.from_contrastive(base, cfg)
        model.prompter.load_state_dict(load_file(str(model_dir / CLOC_WEIGHTS)))
        return model.eval()


def is_cloc_dir(path: str | Path) -> bool:
    return (Path(path) / CLOC_FILE).is_file() and (Path(path) / "image_tower").is_dir()


def build_cloc_model(cfg: Any, run_dir: Path, corpus_files: Sequence[Path], seed: int) -> ClocModel:
    """Model kind `cloc`: `model.encoder` = EncoderConfig + `cloc:` (ClocConfig).

    `model.init_from` may name a CLOC folder (continue) or a contrastive one (a CLIP start: fresh Prompter).
    """
    from encoders.contrastive import build_contrastive_model

    enc = dict(cfg.encoder or {})
    cloc = cloc_config(enc.pop("cloc", None))
    if cfg.init_from and is_cloc_dir(cfg.init_from):
        return ClocModel.from_pretrained(cfg.init_from)
    base = build_contrastive_model(replace(cfg, encoder=enc), run_dir, corpus_files, seed)
    return ClocModel.from_contrastive(base, cloc).train()


# --------------------------------------------------------------------------------------------------------
# Data: captions.jsonl joined with regions.jsonl
# --------------------------------------------------------------------------------------------------------


def read_regions(path: Path) -> dict[str, dict[str, Any]]:
    """id -> {"width", "height", "boxes": [[x1, y1, x2, y2] normalised], "phrases"}.

    A bad row is an error naming its line."""
    from mllm.data.conversations import DataError

    out: dict[str, dict[str, Any]] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        where = f"{path} line {i + 1}"
        try:
            row = json.loads(line)
            w, h = float(row["width"]), float(row["height"])
            boxes, phrases = [], []
            for r in row["regions"]:
                x1, y1, x2, y2 = (float(v) for v in r["box"])
                if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
                    raise ValueError(f"box {r['box']} is not inside the {w:g}x{h:g} image")
                if not isinstance(r["phrase"], str) or not r["phrase"].strip():
                    raise ValueError("empty phrase")
                boxes.append([x1 / w, y1 / h, x2 / w, y2 / h])
                phrases.append(r["phrase"])
            out[str(row["id"])] = {"width": w, "height": h, "boxes": boxes, "phrases": phrases}
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where}: {type(e).__name__}: {e}") from e
    return out


class RegionCaptionDataset(Dataset):
    """GeoWorld captions (the CLIP pair) with the image's region boxes and phrases (CLOC's extra signal).

    Up to M regions per fetch, drawn with a generator seeded from the global torch RNG (which the engine
    seeds and restores on resume). Images must be square: the boxes are normalised to the image and the
    tower's processor must see all of it (no centre crop cutting boxes off).
    """

    def __init__(
        self,
        captions: str | Path,
        regions: str | Path,
        image_root: str | Path | None,
        preprocess: Callable[[Sequence[Image.Image]], torch.Tensor],
        caption: str = "long",
        regions_per_image: int = 4,
        skip_bad_samples: bool = False,
    ):
        from mllm.data.captions import CaptionDataset
        from mllm.data.conversations import DataError

        self.captions = CaptionDataset(
            captions, image_root, preprocess, caption, skip_bad_samples=skip_bad_samples
        )
        self.regions_path = Path(regions)
        if not self.regions_path.is_file():
            raise FileNotFoundError(f"CLOC needs region boxes: {self.regions_path} does not exist")
        self.regions = read_regions(self.regions_path)
        self.m = regions_per_image
        for i, row in enumerate(self.captions.rows):
            rid = str(row.get("id", i)) if isinstance(row, dict) else None
            reg = self.regions.get(rid) if rid is not None else None
            if reg is not None and reg["width"] != reg["height"]:
                raise DataError(
                    f"{self.regions_path}: image {rid!r} is {reg['width']:g}x{reg['height']:g}; "
                    "CLOC needs square images (normalised boxes must match what the tower sees)"
                )

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.captions[i]
        if "skip" in item:
            return item
        reg = self.regions.get(item["id"], {"boxes": [], "phrases": []})
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        keep = sample_regions(len(reg["boxes"]), self.m, gen)
        item["boxes"] = torch.tensor([reg["boxes"][k] for k in keep], dtype=torch.float32).reshape(-1, 4)
        item["phrases"] = [reg["phrases"][k] for k in keep]
        return item


class RegionCaptionCollator(CaptionCollator):
    """CaptionCollator's batch plus the batch's regions flattened: tokens, boxes, owning image index."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().__call__(items)
        items = [it for it in items if "skip" not in it]
        if not items:
            return batch
        phrases = [p for it in items for p in it["phrases"]]
        batch["region_boxes"] = torch.cat([it["boxes"] for it in items]).reshape(-1, 4)
        batch["region_image"] = torch.tensor(
            [j for j, it in enumerate(items) for _ in it["phrases"]], dtype=torch.long
        )
        if phrases:
            batch["region_input_ids"], batch["region_attention_mask"] = self.tokenize(phrases)
        else:
            batch["region_input_ids"] = torch.zeros(0, 1, dtype=torch.long)
            batch["region_attention_mask"] = torch.zeros(0, 1, dtype=torch.long)
        return batch


def cloc_task(model: ClocModel, stage: Any, template: str):
    """Stage kind `cloc`: data.json = captions.jsonl; its regions.jsonl sibling (ClocConfig.regions_file)."""
    if not stage.data.json:
        raise ValueError(f"stage {stage.name!r}: data.json (a GeoWorld captions.jsonl) is not set")
    if not isinstance(model, ClocModel):
        raise ValueError(
            f"stage {stage.name!r} is a CLOC stage but the model is a {type(model).__name__}; "
            "set model.kind: cloc"
        )
    regions = Path(stage.data.json).parent / model.cloc_cfg.regions_file
    ds = RegionCaptionDataset(
        stage.data.json,
        regions,
        stage.data.images,
        model.image_tower.preprocess,
        stage.data.caption,
        model.cloc_cfg.regions_per_image,
        stage.data.skip_bad_samples,
    )
    return model, ds, RegionCaptionCollator(model.text_tower.tokenize)


# --------------------------------------------------------------------------------------------------------
# Evaluation on held-out GeoWorld: region retrieval and grounding
# --------------------------------------------------------------------------------------------------------


def heldout_regions(
    scenes_jsonl: str | Path, limit: int | None = None, image_root: str | Path | None = None
) -> list[dict[str, Any]]:
    """Regions of a GeoWorld scenes file (e.g. eval/scenes.jsonl): the writer's boxes and unique phrases.

    Image paths are relative to `image_root`, by default the world folder (held-out scenes files sit one
    level below it and name `eval/images/...`).
    """
    from mllm.data.geoworld.language import region_phrase
    from mllm.data.geoworld.scene import scene_from_dict

    path = Path(scenes_jsonl)
    root = (
        Path(image_root)
        if image_root is not None
        else (path.parent.parent if path.parent.name in ("eval", "mmvp", "pope", "refcoco") else path.parent)
    )
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[:limit]:
        row = json.loads(line)
        scene = scene_from_dict(row["scene"])
        if scene.figure is not None:
            continue
        regs = []
        for i, s in enumerate(scene.shapes):
            phrase = region_phrase(scene, i)
            if phrase:
                x1, y1, x2, y2 = s.box
                regs.append(
                    {
                        "box": [x1 / scene.width, y1 / scene.height, x2 / scene.width, y2 / scene.height],
                        "phrase": phrase,
                    }
                )
        if regs:
            rows.append({"image": str(root / row["image"]), "regions": regs})
    return rows


def _load(path: str) -> Image.Image:
    from mllm.data.images import load_image

    return load_image(path)


@torch.no_grad()
def crop_region_embeddings(
    model: ContrastiveModel, images: Sequence[Image.Image], boxes: torch.Tensor, image_index: torch.Tensor
) -> torch.Tensor:
    """The CLIP baseline's region embedding: crop the box out of the image and embed the crop."""
    crops = []
    for b, k in zip(boxes.tolist(), image_index.tolist(), strict=True):
        im = images[k]
        w, h = im.size
        crops.append(im.crop((b[0] * w, b[1] * h, b[2] * w, b[3] * h)))
    return model.embed_images(crops)


@torch.no_grad()
def evaluate_regions(
    model: ContrastiveModel, rows: list[dict[str, Any]], batch: int = 64
) -> dict[str, float]:
    """Region retrieval (region -> phrase R@1 over every distinct phrase of the set; a hit is the same
    phrase text) and, for a CLOC model, grounding Acc@0.5 (IoU of the predicted box with the true one).

    A plain ContrastiveModel (CLIP) gets region embeddings from crops; it has no grounding head.
    """
    images = [_load(r["image"]) for r in rows]
    boxes = torch.tensor([reg["box"] for r in rows for reg in r["regions"]], dtype=torch.float32)
    phrases = [reg["phrase"] for r in rows for reg in r["regions"]]
    owner = torch.tensor([i for i, r in enumerate(rows) for _ in r["regions"]])
    vocab = sorted(set(phrases))
    text = model.embed_texts(vocab)
    want = torch.tensor([vocab.index(p) for p in phrases])
    emb, pred = [], []
    for s in range(0, len(rows), batch):
        sel = (owner >= s) & (owner < s + batch)
        idx = owner[sel] - s
        if isinstance(model, ClocModel):
            pix = model.image_tower.preprocess(images[s : s + batch])
            emb.append(model.region_embeddings(pix, boxes[sel], idx))
            pred.append(
                model.ground_boxes(pix, [p for p, m in zip(phrases, sel.tolist(), strict=True) if m], idx)
            )
        else:
            emb.append(crop_region_embeddings(model, images[s : s + batch], boxes[sel], idx))
    region = torch.cat(emb)
    top1 = (region @ text.to(region.device).t()).argmax(1).cpu()
    out = {"regions": len(phrases), "phrases": len(vocab), "region_r1": float((top1 == want).float().mean())}
    if pred:
        iou = box_iou(torch.cat(pred).cpu(), boxes)
        out["ground_acc50"] = float((iou >= 0.5).float().mean())
        out["ground_miou"] = float(iou.mean())
    return out


def mean_box_accuracy(rows: list[dict[str, Any]], train_regions: str | Path) -> dict[str, float]:
    """The no-image reference for grounding: always answer the mean training box (Acc@0.5, mIoU)."""
    boxes = [b for r in read_regions(Path(train_regions)).values() for b in r["boxes"]]
    mean = torch.tensor(boxes, dtype=torch.float32).mean(0, keepdim=True)
    truth = torch.tensor([reg["box"] for r in rows for reg in r["regions"]], dtype=torch.float32)
    iou = box_iou(mean.expand_as(truth), truth)
    return {"mean_box_acc50": float((iou >= 0.5).float().mean()), "mean_box_miou": float(iou.mean())}


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m encoders.cloc --model DIR --scenes WORLD/eval/scenes.jsonl [--out FILE]`."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", required=True, help="a CLOC or contrastive model folder")
    ap.add_argument(
        "--scenes", required=True, help="a GeoWorld scenes.jsonl (held-out: WORLD/eval/scenes.jsonl)"
    )
    ap.add_argument("--images", default=None, help="image root (default: the world folder)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument(
        "--train-regions",
        default=None,
        help="a training regions.jsonl: also report the mean-box reference for grounding",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model = (
        ClocModel.from_pretrained(args.model)
        if is_cloc_dir(args.model)
        else ContrastiveModel.from_pretrained(args.model)
    )
    rows = heldout_regions(args.scenes, args.limit, args.images)
    result = evaluate_regions(model, rows)
    if args.train_regions:
        result.update(mean_box_accuracy(rows, args.train_regions))
    result["model"] = args.model
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
