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

This module is the model only: its data is `mllm.data.views`, its builder and stage task
`mllm.families.tips`, its evidence the dense probe `mllm.evaluation.dense_probe`
(`mllm probe dense`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from encoders.common import from_dict
from encoders.contrastive import (
    ContrastiveHeads,
    ContrastiveModel,
    EncoderConfig,
    extension_section,
    is_extension_dir,
)
from encoders.ssl.config import AugmentConfig, DistillConfig
from encoders.ssl.distill import SelfDistillation
from encoders.text_tower import TextTower
from encoders.towers import Tower

TIPS_WEIGHTS = "tips.safetensors"


@dataclass
class TipsConfig:
    """`model.encoder.tips` of a TIPS recipe (the rest of `model.encoder` is the contrastive pair's)."""

    short_weight: float = 1.0  # CLS1 <-> noisy short caption
    long_weight: float = 1.0  # CLS2 <-> exact long caption
    distill: DistillConfig = field(default_factory=DistillConfig)  # DINO + iBOT (weights, mask, EMA)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def tips_config(raw: dict[str, Any] | None) -> TipsConfig:
    return from_dict(TipsConfig, raw or {}, "model.encoder.tips")


@dataclass
class TipsEncoderConfig(EncoderConfig):
    """`model.encoder` of model kind `tips`: the contrastive pair's settings plus `tips:`."""

    tips: TipsConfig = field(default_factory=TipsConfig)


@dataclass
class TipsOutput:
    loss: torch.Tensor
    stats: dict[str, torch.Tensor | float]  # logged by the training engine (metrics.jsonl `stats`)


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
        stats = {"short": l_short.detach(), "long": l_long.detach(), **parts}
        return TipsOutput(loss, stats)

    # -- persistence ----------------------------------------------------------------------------------------

    KIND = "tips"

    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "tips": asdict(self.tips_cfg)}

    def write_parts(self, folder: Path) -> None:
        """The ContrastiveModel files (contrastive.json of kind `tips`, with the `tips` section) +
        `tips.safetensors` (cls2_proj, distill)."""
        super().write_parts(folder)
        state = {
            k: v.detach().contiguous().cpu()
            for k, v in self.state_dict().items()
            if k.startswith(("cls2_proj.", "distill."))
        }
        save_file(state, str(folder / TIPS_WEIGHTS))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> TipsModel:
        model_dir = Path(model_dir)
        section = extension_section(model_dir, "tips")
        base = ContrastiveModel.from_pretrained(model_dir)
        model = cls.from_contrastive(base, tips_config(section))
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
    return is_extension_dir(path, "tips")
