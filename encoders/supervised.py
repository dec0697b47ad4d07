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

#: Weight of the density head's loss against the per-patch attribute heads'. A density is a small
#: probability (an object's unit mass over 2-9 patches) whose soft-label cross-entropy gives small
#: gradients; measured on the demo's warm-up (seed 1; docs/results.md, "Eighth round"), weight 1 summed to
#: the right count on 229 of 263 held-out scenes, 4 on 253 and 8 on 258, while the shape head's
#: per-patch accuracy went 90.5 -> 87.1 -> 85.8%.
DENSITY_WEIGHT = 4.0


@dataclass(frozen=True)
class PatchTargets:
    """Label vocabularies; index 0 is "background / none" for the per-patch targets."""

    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    sizes: tuple[str, ...] = ("small", "large")
    orientations: tuple[str, ...] = ("up", "right", "down", "left", "horizontal", "vertical")
    max_count: int = 8
    density: bool = False  # a per-patch object-density head (the anchored projector's "object" word)

    def heads(self) -> dict[str, int]:
        return {name: len(words) for name, words in self.words().items()}

    def words(self) -> dict[str, tuple[str | None, ...]]:
        """Each per-patch head's classes as the words that name them (None: background / no object).

        `density`: P("object") at a patch is the share of an object's unit mass that the patch holds
        (mllm.data.scene_labels), so summing it over the patches that show a word counts the objects
        with that word, where summing covered patches would count their area.
        """
        words = {
            "colour": (None, *self.colours),
            "shape": (None, *self.shapes),
            "size": (None, *self.sizes),
            "orientation": (None, *self.orientations),
        }
        return {**words, "density": (None, "object")} if self.density else words


class PatchSupervision(nn.Module):
    """Tower + linear heads; `forward` returns an object with `.loss` so the engine can train it.

    `readout`: a Linear (an MLLM projector's first layer) whose first rows become the per-patch heads
    instead of separate ones. Why: the tower then learns to say colour and shape in exactly the
    directions the LM's input reads, as loud, disentangled logits. With separate heads (discarded), a
    frozen tower whose patches a linear probe reads at 98% still left a fresh projector + LM unable to
    read colour or shape in 200 steps (docs/results.md, "Models that see").
    """

    def __init__(self, tower: Tower, targets: PatchTargets, readout: nn.Linear | None = None):
        super().__init__()
        self.tower = tower
        self.targets = targets
        d = tower.hidden_size
        sizes = targets.heads()
        if readout is None:
            self.heads = nn.ModuleDict({k: nn.Linear(d, n) for k, n in sizes.items()})
            self.rows = None
        else:
            if readout.in_features != d or readout.out_features < sum(sizes.values()):
                raise ValueError(
                    f"readout {readout} cannot hold {sum(sizes.values())} head rows over {d}-wide tokens"
                )
            self.heads = readout  # trained under the prefix "heads", shared with the projector
            starts = torch.cumsum(torch.tensor([0, *sizes.values()]), 0).tolist()
            self.rows = {k: (starts[i], starts[i + 1]) for i, k in enumerate(sizes)}
        self.count = nn.Linear(d, targets.max_count + 1)

    def _logits(self, name: str, tokens: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return self.heads[name](tokens)
        a, b = self.rows[name]
        return F.linear(tokens, self.heads.weight[a:b], self.heads.bias[a:b])

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: dict[str, torch.Tensor] | None = None,
        count: torch.Tensor | None = None,
        **_,
    ) -> SupervisionOutput:
        feats = self.tower(pixel_values.to(next(self.tower.parameters()).dtype))
        tokens = feats.tokens  # [B, N, D]
        losses = {}
        for name in self.targets.heads():
            logits = self._logits(name, tokens).float()
            if labels is not None and name == "density":
                losses[name] = DENSITY_WEIGHT * _density_loss(logits, labels[name])
            elif labels is not None:
                losses[name] = F.cross_entropy(
                    logits.flatten(0, 1), labels[name].flatten(), ignore_index=IGNORE
                )
        if count is not None:
            losses["count"] = F.cross_entropy(self.count(tokens.mean(1)).float(), count, ignore_index=IGNORE)
        loss = sum(losses.values()) if losses else None
        return SupervisionOutput(loss, {k: v.detach() for k, v in losses.items()})


def _density_loss(logits: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """Soft-label CE of a 2-way head against per-patch densities d (P(class 1) -> d); d < 0 (IGNORE: a math
    figure's patches) is ignored."""
    keep = density >= 0
    d = density[keep].to(logits.dtype)
    target = torch.stack([1 - d, d], -1)
    return F.cross_entropy(logits[keep], target) if bool(keep.any()) else logits.sum() * 0.0


@dataclass
class SupervisionOutput:
    loss: torch.Tensor | None
    stats: dict[str, torch.Tensor]  # each head's loss, detached; logged by the training engine
