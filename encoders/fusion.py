"""Mixture of Features (MoF, "Eyes Wide Shut?"): two towers' tokens combined for one LLM.

- `additive`: F = α·first + (1−α)·second, then ONE projector; N tokens. Both streams must have the same
  width, and the same grid unless a resampling is declared (`resample="bilinear"` resizes the second
  stream's patch grid to the first's) — silently padding or truncating would mix unrelated patches.
- `interleaved`: one projector per stream, then tokens interleaved c1, d1, c2, d2, …; 2N tokens, the
  spatial order of each stream kept. Widths may differ (each stream has its own projector); grids must
  match, again unless a resampling is declared.

The module itself has no parameters: the projectors belong to the model (they are what `align` trains),
so `StreamProjectors` holds the interleaved pair under the one `projector` name the stages already know.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from encoders.towers import VisionFeatures

__all__ = [
    "MOF_MODES",
    "RESAMPLE_MODES",
    "MixtureOfFeatures",
    "StreamProjectors",
    "interleave",
    "resample_tokens",
]

MOF_MODES = ("additive", "interleaved")
RESAMPLE_MODES = ("none", "bilinear")


def resample_tokens(tokens: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """[B, h*w, D] patch tokens on `grid` -> [B, H*W, D] on `target`, bilinearly over the 2-D patch grid."""
    if tuple(grid) == tuple(target):
        return tokens
    b, n, d = tokens.shape
    if n != grid[0] * grid[1]:
        raise ValueError(
            f"{n} tokens do not form a {grid[0]}x{grid[1]} grid (CLS kept? use select_feature=patch)"
        )
    maps = tokens.transpose(1, 2).reshape(b, d, grid[0], grid[1])
    maps = F.interpolate(maps, size=tuple(target), mode="bilinear", align_corners=False)
    return maps.flatten(2).transpose(1, 2)


def interleave(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """[B, N, d] and [B, N, d] -> [B, 2N, d] ordered first[0], second[0], first[1], second[1], …"""
    if first.shape != second.shape:
        raise ValueError(
            f"interleaving needs equal shapes, got {tuple(first.shape)} and {tuple(second.shape)}"
        )
    b, n, d = first.shape
    return torch.stack([first, second], dim=2).reshape(b, 2 * n, d)


class StreamProjectors(nn.ModuleList):
    """One projector per stream (interleaved MoF). A ModuleList so keys read `projector.0.*`, `projector.1.*`."""


class MixtureOfFeatures(nn.Module):
    """Combine the features of two towers that saw the same image (see the module docstring)."""

    def __init__(self, mode: str = "interleaved", alpha: float = 0.5, resample: str = "none") -> None:
        super().__init__()
        if mode not in MOF_MODES:
            raise ValueError(f"MoF mode must be one of {MOF_MODES}, got {mode!r}")
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"MoF resample must be one of {RESAMPLE_MODES}, got {resample!r}")
        if mode == "additive" and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"additive MoF needs 0 <= alpha <= 1, got {alpha}")
        self.mode = mode
        self.alpha = float(alpha)
        self.resample = resample

    def extra_repr(self) -> str:
        return f"mode={self.mode}, alpha={self.alpha}, resample={self.resample}"

    @property
    def num_streams(self) -> int:
        """How many projectors the mixture needs: one for additive, one per tower for interleaved."""
        return 1 if self.mode == "additive" else 2

    def check(self, first: tuple[int, tuple[int, int]], second: tuple[int, tuple[int, int]]) -> None:
        """Refuse, at build time, two towers this mixture cannot combine: (width, grid) of each."""
        (w1, g1), (w2, g2) = first, second
        if self.mode == "additive" and w1 != w2:
            raise ValueError(
                f"additive MoF adds the two streams, so their widths must match: {w1} vs {w2}; "
                "use mode=interleaved (one projector per stream) or towers of equal width"
            )
        if tuple(g1) != tuple(g2) and self.resample == "none":
            raise ValueError(
                f"MoF streams have different patch grids {tuple(g1)} and {tuple(g2)}; declare "
                "resample=bilinear to resize the second stream's grid to the first's"
            )

    def num_tokens(self, first_tokens: int) -> int:
        """Image tokens the LLM sees per image: N (additive) or 2N (interleaved)."""
        return first_tokens if self.mode == "additive" else 2 * first_tokens

    def align(self, first: VisionFeatures, second: VisionFeatures) -> torch.Tensor:
        """The second stream's tokens on the first stream's grid (a no-op when the grids match)."""
        if tuple(first.grid) != tuple(second.grid):
            if self.resample == "none":
                raise ValueError(
                    f"MoF grids differ ({first.grid} vs {second.grid}) and no resampling is declared"
                )
            return resample_tokens(second.tokens, second.grid, first.grid)
        return second.tokens

    def mix(self, first: VisionFeatures, second: VisionFeatures) -> torch.Tensor:
        """Additive mixture α·first + (1−α)·second, [B, N, D], before the projector."""
        other = self.align(first, second).to(first.tokens.dtype)
        return self.alpha * first.tokens + (1.0 - self.alpha) * other

    def forward(
        self, first: VisionFeatures, second: VisionFeatures, projectors: Sequence[nn.Module]
    ) -> torch.Tensor:
        """Projected image embeddings [B, N or 2N, d_llm]; `projectors` has `num_streams` modules."""
        if len(projectors) != self.num_streams:
            raise ValueError(f"{self.mode} MoF needs {self.num_streams} projector(s), got {len(projectors)}")
        if self.mode == "additive":
            proj = projectors[0]
            return proj(self.mix(first, second).to(_dtype(proj, first.tokens)))
        p1, p2 = projectors
        e1 = p1(first.tokens.to(_dtype(p1, first.tokens)))
        other = self.align(first, second)
        e2 = p2(other.to(_dtype(p2, other)))
        return interleave(e1, e2.to(e1.dtype))


def _dtype(module: nn.Module, fallback: torch.Tensor) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return fallback.dtype
