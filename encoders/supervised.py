"""A supervised warm-up for a tower trained from scratch: per-patch attributes from scene graphs.

A randomly initialised tower frozen behind a projector teaches an MLLM nothing, and learning to see
only through the language loss is slow on a CPU. GeoWorld knows what is under every patch, so the
tower can first learn, per patch, the colour, shape, size and orientation of the object covering it,
plus the scene's object count from the pooled tokens: dense, local targets that build exactly the
fine-grained features the MLLM's questions need. The heads are discarded afterwards; only the tower
is kept. (The contrastive encoders issue replaces this with CLIP-style pretraining.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from encoders.towers import Tower

IGNORE = -100


@dataclass(frozen=True)
class PatchTargets:
    """Label vocabularies; index 0 is "background / none" for the per-patch targets."""

    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    sizes: tuple[str, ...] = ("small", "large")
    orientations: tuple[str, ...] = ("up", "right", "down", "left", "horizontal", "vertical")
    max_count: int = 8

    def heads(self) -> dict[str, int]:
        return {"colour": len(self.colours) + 1, "shape": len(self.shapes) + 1, "size": len(self.sizes) + 1,
                "orientation": len(self.orientations) + 1}


class PatchSupervision(nn.Module):
    """Tower + linear heads; `forward` returns an object with `.loss` so the engine can train it."""

    def __init__(self, tower: Tower, targets: PatchTargets):
        super().__init__()
        self.tower = tower
        self.targets = targets
        d = tower.hidden_size
        self.heads = nn.ModuleDict({k: nn.Linear(d, n) for k, n in targets.heads().items()})
        self.count = nn.Linear(d, targets.max_count + 1)

    def forward(self, pixel_values: torch.Tensor, labels: dict[str, torch.Tensor] | None = None,
                count: torch.Tensor | None = None, **_) -> SupervisionOutput:
        feats = self.tower(pixel_values.to(next(self.tower.parameters()).dtype))
        tokens = feats.tokens  # [B, N, D]
        losses = {}
        for name, head in self.heads.items():
            logits = head(tokens).float()
            if labels is not None:
                losses[name] = F.cross_entropy(logits.flatten(0, 1), labels[name].flatten(), ignore_index=IGNORE)
        if count is not None:
            losses["count"] = F.cross_entropy(self.count(tokens.mean(1)).float(), count, ignore_index=IGNORE)
        loss = sum(losses.values()) if losses else None
        return SupervisionOutput(loss, {k: float(v.detach()) for k, v in losses.items()})


@dataclass
class SupervisionOutput:
    loss: torch.Tensor | None
    parts: dict[str, float]
