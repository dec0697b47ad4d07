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
from encoders.ssl.tower_objectives import build_objective
from encoders.towers import Tower, TowerConfig, build_tower


@dataclass
class SSLOutput:
    loss: torch.Tensor
    stats: dict[
        str, torch.Tensor | float
    ]  # dino, ibot (detached), teacher_temp; logged by the training engine


class SSLModel(nn.Module):
    """Model kind `ssl`: a Dinov2 tower trained by DINO + iBOT on images alone, or by the tower objective
    `cfg.objective` names (its module is `objective` in place of `distill`).

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
        # SwAV, SupCon, PixPro, MLCD (encoders.ssl.tower_objectives): heads and loss of their own
        if cfg.objective != "dino":
            self.objective = build_objective(cfg, tower)
            return
        self.distill = SelfDistillation(
            tower.model, tower.hidden_size, tower.num_prefix_tokens, cfg.distill, grad_accum, total_steps
        )

    def configure_schedule(self, grad_accum: int, total_steps: int) -> None:
        """Set by the stage: the schedules count optimiser steps, which depend on the stage's settings."""
        if self.cfg.objective == "dino":
            self.distill.configure_schedule(grad_accum, total_steps)
        elif hasattr(self.objective, "configure_schedule"):
            self.objective.configure_schedule(grad_accum, total_steps)

    def after_step(self) -> None:
        """Called by the engine after each optimiser step: an objective with an EMA teacher (PixPro)
        updates it here (DINO's teacher updates lazily inside its forward instead)."""
        hook = getattr(getattr(self, "objective", None), "after_step", None)
        if hook is not None:
            hook()

    def forward(
        self,
        global_views: torch.Tensor,
        local_views: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        **extra: Any,
    ) -> SSLOutput:
        if self.cfg.objective != "dino":
            fields = {k: extra.get(k) for k in self.objective.needs}
            encode = self.encode_patches if getattr(self.objective, "dense", False) else self.encode_cls
            loss, stats = self.objective(encode, global_views, local_views, **fields)
            return SSLOutput(loss, stats)
        loss, stats, _ = self.distill(global_views, local_views, masks)
        return SSLOutput(loss, stats)

    def encode_cls(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's CLS token after its final LayerNorm [N, hidden] (what the non-DINO objectives read)."""
        dtype = next(self.image_tower.model.parameters()).dtype
        return self.image_tower.model(pixel_values=pixel_values.to(dtype)).last_hidden_state[:, 0]

    def encode_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's patch tokens after its final LayerNorm [N, P, hidden] (PixPro's dense input)."""
        dtype = next(self.image_tower.model.parameters()).dtype
        hidden = self.image_tower.model(pixel_values=pixel_values.to(dtype)).last_hidden_state
        return hidden[:, self.image_tower.num_prefix_tokens :]

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
