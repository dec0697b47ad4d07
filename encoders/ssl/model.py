"""`SSLModel` (model kind `ssl`): a Dinov2-family tower trained by DINO + iBOT on images alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from encoders.ssl.config import SSLConfig, config_from_dict
from encoders.ssl.distill import SelfDistillation
from encoders.ssl.saving import load_extra, read_meta, save_encoder
from encoders.towers import Tower, TowerConfig, build_tower


@dataclass
class SSLOutput:
    loss: torch.Tensor
    stats: dict[
        str, torch.Tensor | float
    ]  # dino, ibot (detached), teacher_temp; logged by the training engine


class SSLModel(nn.Module):
    """Model kind `ssl`: a Dinov2 tower trained by DINO + iBOT on images alone.

    Saved folder: `image_tower/` (HF Dinov2Model + processor: loads with TowerConfig(type="dinov2",
    path=...)), `ssl.safetensors` (heads, EMA teacher, centres, counter) and `ssl.json` (the meta file:
    kind `ssl`, format_version, configs).
    """

    FORMAT_VERSION = 1

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
        loss, stats, _ = self.distill(global_views, local_views, masks)
        return SSLOutput(loss, stats)

    # -- saving ---------------------------------------------------------------------------------------------

    def exported_tower_state(self) -> dict[str, torch.Tensor] | None:
        """The teacher's backbone weights when `export == "teacher"`, else None (the student as is)."""
        if self.cfg.export == "student":
            return None
        if self.cfg.export != "teacher":
            raise ValueError(f"export must be 'student' or 'teacher', got {self.cfg.export!r}")
        return self.distill.teacher.state_for("backbone")

    def save_pretrained(self, out_dir: str | Path) -> Path:
        return save_encoder(
            self, out_dir, "ssl", {"ssl": asdict(self.cfg)}, self.exported_tower_state(), self.FORMAT_VERSION
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> SSLModel:
        model_dir = Path(model_dir)
        meta = read_meta(model_dir, "ssl", cls.FORMAT_VERSION)
        cfg = config_from_dict(SSLConfig, meta["ssl"], f"{model_dir}/ssl.json:ssl")
        tower = build_tower(TowerConfig(**{**meta["tower"], "path": str(model_dir / "image_tower")}))
        model = cls(tower, cfg)
        load_extra(model, model_dir, "ssl")
        return model
