"""TIPS: text-image pretraining with spatial awareness (two CLS tokens, two captions, self-distillation).

A CLIP tower is shaped by one global token, so its patch tokens are left to drift; TIPS keeps the
contrastive signal but adds the two losses that make patch tokens good dense features:

- a ViT with **two CLS tokens**: HF `Dinov2WithRegistersModel` with its first register token acting as
  the second CLS (it is a learned token the patches attend to, exactly what a second CLS is), so the
  trained tower saves and loads as tower type `dinov2_registers`;
- **CLS1 <-> the noisy short caption** and **CLS2 <-> the exact long caption**, each with a contrastive
  objective from `encoders.objectives` (`model.encoder.objective`, `clip` by default) sharing one text
  tower and one temperature; CLS1 goes through the ContrastiveModel's `image_proj`, so loading the
  folder as a plain ContrastiveModel gives the CLS1/short-caption model; CLS2 has its own projection;
- **DINO self-distillation and iBOT masked image modelling** from an EMA teacher (`encoders.ssl`), on
  two augmented global views of the same image, while the contrastive losses see the clean image.

Defaults (`TipsConfig`, all recipe values): short_weight = long_weight = 1, distill.dino_weight = 1,
distill.ibot_weight = 1, mask_prob 0.5 with mask ratio U(0.1, 0.5), EMA momentum 0.996 -> 1 (cosine).
The paper does not fix the weights or the mask ratio (../shared/reference/methods.md, "TIPS"); these
are iBOT's and DINO's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from encoders.contrastive import ContrastiveHeads, ContrastiveModel, EncoderConfig
from encoders.ssl import (
    AugmentConfig,
    DistillConfig,
    ImageViewsDataset,
    SelfDistillation,
    augmenter_for,
    stage_optimizer_steps,
)
from encoders.text_tower import TextTower
from encoders.towers import Tower

TIPS_FILE = "tips.json"
TIPS_WEIGHTS = "tips.safetensors"


@dataclass
class TipsConfig:
    """`model.encoder.tips` of a TIPS recipe (the rest of `model.encoder` is the contrastive pair's)."""

    short_weight: float = 1.0  # CLS1 <-> noisy short caption
    long_weight: float = 1.0  # CLS2 <-> exact long caption
    distill: DistillConfig = field(default_factory=DistillConfig)  # DINO + iBOT (weights, mask, EMA)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def tips_config(raw: dict[str, Any] | None) -> TipsConfig:
    from mllm.config import from_dict

    return from_dict(TipsConfig, raw or {}, "model.encoder.tips")


@dataclass
class TipsOutput:
    loss: torch.Tensor
    stats: dict[str, float]


class TipsModel(ContrastiveModel):
    """ContrastiveModel over a Dinov2-with-registers tower + a CLS2 projection + SelfDistillation."""

    def __init__(
        self,
        image_tower: Tower,
        text_tower: TextTower,
        cfg: EncoderConfig,
        heads: ContrastiveHeads | None = None,
        tips: TipsConfig | None = None,
    ):
        super().__init__(image_tower, text_tower, cfg, heads)
        n_reg = int(getattr(image_tower.model.config, "num_register_tokens", 0) or 0)
        if image_tower.config.type != "dinov2_registers" or n_reg < 1:
            raise ValueError(
                "TIPS needs a second CLS token: an image tower of type 'dinov2_registers' with "
                f"num_register_tokens >= 1 (got {image_tower.config.type!r}, {n_reg} registers)"
            )
        if self.needs:
            raise ValueError(
                f"TIPS uses global objectives only; {cfg.objective!r} needs {sorted(self.needs)}"
            )
        if cfg.image_pool != "pooler":
            raise ValueError(
                "TIPS pairs CLS1 with the short caption, so model.encoder.image_pool must be 'pooler'"
            )
        self.tips_cfg = tips or TipsConfig()
        self.cls2_proj = nn.Linear(image_tower.hidden_size, cfg.embed_dim, bias=False)
        self.distill = SelfDistillation(
            image_tower.model, image_tower.hidden_size, image_tower.num_prefix_tokens, self.tips_cfg.distill
        )

    @classmethod
    def from_contrastive(cls, base: ContrastiveModel, tips: TipsConfig) -> TipsModel:
        return cls(base.image_tower, base.text_tower, base.cfg, base.heads, tips)

    def configure_schedule(self, grad_accum: int, total_steps: int) -> None:
        self.distill.configure_schedule(grad_accum, total_steps)

    def image_embeddings(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS1 embedding [B, E] (= `encode_image`), CLS2 embedding [B, E]), both L2-normalised.

        Dinov2WithRegisters lays tokens out as [CLS, registers..., patches] after its final LayerNorm,
        so CLS1 is token 0 and CLS2 (the first register) is token 1.
        """
        tower = self.image_tower
        hidden = tower.model(
            pixel_values=pixel_values.to(device=tower.device, dtype=tower.dtype)
        ).last_hidden_state
        return (
            F.normalize(self.heads.image_proj(hidden[:, 0]), dim=-1),
            F.normalize(self.cls2_proj(hidden[:, 1]), dim=-1),
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        long_input_ids: torch.Tensor,
        long_attention_mask: torch.Tensor,
        global_views: torch.Tensor,
        masks: torch.Tensor | None = None,
        local_views: torch.Tensor | None = None,
        **_: Any,
    ) -> TipsOutput:
        """input_ids/attention_mask: the short captions; long_*: the long ones; views, masks: see
        SelfDistillation."""
        cfg = self.tips_cfg
        img1, img2 = self.image_embeddings(pixel_values)
        short = self.encode_text(input_ids, attention_mask)
        long = self.encode_text(long_input_ids, long_attention_mask)
        scale, bias = self.logit_scale(), self.logit_bias()
        l_short, _ = self.objective(img1, short, scale, bias)
        l_long, _ = self.objective(img2, long, scale, bias)
        l_ssl, parts, _ = self.distill(global_views, local_views, masks)
        loss = cfg.short_weight * l_short + cfg.long_weight * l_long + l_ssl
        stats = {"short": float(l_short.detach()), "long": float(l_long.detach()), **parts}
        return TipsOutput(loss, stats)

    # -- persistence ----------------------------------------------------------------------------------------

    def write_parts(self, folder: Path) -> None:
        """The ContrastiveModel files + `tips.safetensors` (cls2_proj, distill) + `tips.json`."""
        super().write_parts(folder)
        state = {
            k: v.detach().contiguous().cpu()
            for k, v in self.state_dict().items()
            if k.startswith(("cls2_proj.", "distill."))
        }
        save_file(state, str(folder / TIPS_WEIGHTS))
        (folder / TIPS_FILE).write_text(json.dumps({"format_version": 1, "tips": asdict(self.tips_cfg)}, indent=2))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> TipsModel:
        model_dir = Path(model_dir)
        if not (model_dir / TIPS_FILE).is_file():
            raise FileNotFoundError(f"{model_dir}: not a TIPS model folder (no {TIPS_FILE})")
        base = ContrastiveModel.from_pretrained(model_dir)
        model = cls.from_contrastive(
            base, tips_config(json.loads((model_dir / TIPS_FILE).read_text())["tips"])
        )
        state = load_file(str(model_dir / TIPS_WEIGHTS))
        own = {k for k in model.state_dict() if k.startswith(("cls2_proj.", "distill."))}
        if own != set(state):
            raise ValueError(
                f"{model_dir / TIPS_WEIGHTS}: missing {sorted(own - set(state))[:5]}, "
                f"unexpected {sorted(set(state) - own)[:5]}"
            )
        model.load_state_dict(state, strict=False)
        return model.eval()


def is_tips_dir(path: str | Path) -> bool:
    return (Path(path) / TIPS_FILE).is_file() and (Path(path) / "image_tower").is_dir()


def build_tips_model(cfg: Any, run_dir: Path, corpus_files: Sequence[Path], seed: int) -> TipsModel:
    """Model kind `tips`: `model.tower` (dinov2_registers) + `model.encoder` = EncoderConfig + `tips:`."""
    from encoders.contrastive import build_contrastive_model

    enc = dict(cfg.encoder or {})
    tips = tips_config(enc.pop("tips", None))
    if cfg.init_from and is_tips_dir(cfg.init_from):
        return TipsModel.from_pretrained(cfg.init_from)
    base = build_contrastive_model(replace(cfg, encoder=enc), run_dir, corpus_files, seed)
    return TipsModel.from_contrastive(base, tips).train()


# --------------------------------------------------------------------------------------------------------
# Data: both captions of an image, its clean pixels, and its augmented, masked views
# --------------------------------------------------------------------------------------------------------


class TipsDataset(Dataset):
    """GeoWorld captions.jsonl -> clean pixels + short + long caption + DINO views and iBOT masks."""

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None,
        tower: Tower,
        tips: TipsConfig,
        skip_bad_samples: bool = False,
    ):
        self.views = ImageViewsDataset(
            path, image_root, augmenter_for(tower, tips.augment), tower.grid, tips.distill, skip_bad_samples
        )
        self.preprocess = tower.preprocess
        for i, row in enumerate(self.views.rows):
            for key in ("short", "long"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise ValueError(
                        f"{self.views.path} line {i + 1} (id {row.get('id')!r}): no {key!r} caption; "
                        "TIPS needs both GeoWorld captions"
                    )

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from encoders.ssl import image_to_tensor
        from mllm.data.conversations import Skip

        ident, image = self.views.load(i)
        if isinstance(image, Skip):
            return {"skip": image}
        row = self.views.rows[i]
        return {
            "id": ident,
            "pixel_values": self.preprocess([image])[0],
            "short": row["short"],
            "long": row["long"],
            **self.views.views(image_to_tensor(image)),
        }


class TipsCollator:
    def __init__(self, tokenize: Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]]):
        self.tokenize = tokenize

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        from encoders.ssl import collate_views

        batch = collate_views([{k: v for k, v in it.items() if k not in ("short", "long")} for it in items])
        kept = [it for it in items if "skip" not in it]
        if kept:
            batch["input_ids"], batch["attention_mask"] = self.tokenize([it["short"] for it in kept])
            batch["long_input_ids"], batch["long_attention_mask"] = self.tokenize([it["long"] for it in kept])
        return batch


def tips_task(model: TipsModel, stage: Any, template: str):
    """Stage kind `tips`: data.json = a GeoWorld captions.jsonl (both captions per image)."""
    if not stage.data.json:
        raise ValueError(f"stage {stage.name!r}: data.json (a GeoWorld captions.jsonl) is not set")
    if not isinstance(model, TipsModel):
        raise ValueError(
            f"stage {stage.name!r} is a TIPS stage but the model is a {type(model).__name__}; "
            "set model.kind: tips"
        )
    ds = TipsDataset(
        stage.data.json, stage.data.images, model.image_tower, model.tips_cfg, stage.data.skip_bad_samples
    )
    model.configure_schedule(stage.grad_accum, stage_optimizer_steps(stage, len(ds)))
    return model, ds, TipsCollator(model.text_tower.tokenize)


# --------------------------------------------------------------------------------------------------------
# Evidence: a dense linear probe on frozen patch tokens (per-patch colour and shape from scene graphs)
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def patch_features(
    tower: Tower, scenes_jsonl: str | Path, image_root: str | Path, limit: int | None = None, batch: int = 64
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Frozen patch tokens [P, D] of every primitive scene (math figures have no per-patch labels) and
    their labels {"colour", "shape"} [P] (0 = background), from `mllm.data.scene_labels.patch_labels`."""
    from encoders.supervised import PatchTargets
    from mllm.data.geoworld.vocab import COLOR_NAMES, SHAPES
    from mllm.data.images import load_image, resolve_image
    from mllm.data.scene_labels import patch_labels

    targets = PatchTargets(colours=COLOR_NAMES, shapes=SHAPES)
    rows = [json.loads(ln) for ln in Path(scenes_jsonl).read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if r["scene"].get("figure") is None][:limit]
    feats, labels = [], {"colour": [], "shape": []}
    tower.eval()
    for s in range(0, len(rows), batch):
        chunk = rows[s : s + batch]
        images = [load_image(resolve_image(Path(image_root), r["image"])) for r in chunk]
        out = tower(tower.preprocess(images))
        feats.append(out.tokens.float().reshape(-1, out.tokens.shape[-1]).cpu())
        for r in chunk:
            lab = patch_labels(r["scene"], out.grid, targets)
            for k in labels:
                labels[k].append(lab[k])
    return torch.cat(feats), {k: torch.cat(v) for k, v in labels.items()}


def fit_linear_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    classes: int,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> nn.Linear:
    """Multinomial logistic regression on standardised features (full batch, Adam); features frozen."""
    torch.manual_seed(seed)
    probe = nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(probe(x), y).backward()
        opt.step()
    return probe


def dense_probe(
    tower: Tower, world: str | Path, train_limit: int = 1000, steps: int = 300
) -> dict[str, float]:
    """Per-patch colour and shape accuracy of a linear probe trained on `world`'s training scenes and
    tested on its held-out `eval/scenes.jsonl` (all patches, and foreground patches only)."""
    from encoders.supervised import PatchTargets
    from mllm.data.geoworld.vocab import COLOR_NAMES, SHAPES

    world = Path(world)
    heads = PatchTargets(colours=COLOR_NAMES, shapes=SHAPES).heads()
    xtr, ytr = patch_features(tower, world / "scenes.jsonl", world, train_limit)
    xte, yte = patch_features(tower, world / "eval" / "scenes.jsonl", world)
    mean, std = xtr.mean(0), xtr.std(0).clamp(min=1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    out: dict[str, float] = {"train_patches": len(xtr), "test_patches": len(xte)}
    for name in ("colour", "shape"):
        probe = fit_linear_probe(xtr, ytr[name], heads[name], steps)
        with torch.no_grad():
            pred = probe(xte).argmax(1)
        fg = yte[name] != 0
        out[f"{name}_acc"] = float((pred == yte[name]).float().mean())
        out[f"{name}_fg_acc"] = float((pred[fg] == yte[name][fg]).float().mean())
    out["foreground_share"] = float((yte["shape"] != 0).float().mean())
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m encoders.tips --tower DIR/image_tower --type dinov2_registers --world WORLD [--out FILE]`:
    the dense linear probe of a saved tower (or, with --random CONFIG_JSON, of an untrained one)."""
    import argparse

    from encoders.towers import TowerConfig, build_tower

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--tower", help="a saved tower folder (HF), e.g. RUN/tips/final/image_tower")
    ap.add_argument("--type", required=True, help="tower type: clip | dinov2 | dinov2_registers | ...")
    ap.add_argument("--random", default=None, help="JSON config of an untrained tower (a baseline) instead")
    ap.add_argument("--world", required=True)
    ap.add_argument("--train-limit", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    cfg = (
        TowerConfig(type=args.type, config=json.loads(args.random), select_layer=-1)
        if args.random
        else TowerConfig(type=args.type, path=args.tower, select_layer=-1)
    )
    result = dense_probe(build_tower(cfg), args.world, args.train_limit, args.steps)
    result.update(tower=args.tower or f"random {args.type}", type=args.type)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
