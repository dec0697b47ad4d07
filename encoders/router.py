"""SVE-Math's feature router: multi-scale geometric features as routed visual prompts beside CLIP's.

Per level l (feature maps [B, C, h_l, w_l], coarse to fine):
  1. resize to the CLIP patch grid (bilinear), flatten to [B, N, C];
  2. per-level MLP C -> D -> D (D = CLIP width);
  3. context c_l = Linear(mean over tokens);
  4. weight w_l = sigmoid(gate([LN(mean CLIP tokens); LN(c_l)])) — sigmoid, not softmax: levels are
     not forced to compete, each can be switched on or off by the image;
  5. routed_l = w_l · MLP(LN(level tokens)).
The output concatenates [CLIP | routed_1 | … | routed_L] along channels ([B, N, (1+L)·D]) for one
projector, so the LLM sees exactly as many image tokens as with CLIP alone (`merge="concat"`, the
paper's layout).

`merge="residual"` adds the routed levels to the CLIP tokens instead (CLIP + Σ routed_l, [B, N, D]), with
the shared output MLP's last layer starting at zero. Why: a router grafted onto a trained single-tower
model (the seeing demo's anchored projector and question-conditioned readout, both built for the tower's
width) must leave that model's input unchanged at the start, so that the fused model differs from the
tower-only one by what the router learns and by nothing else. A linear first projector layer on the
concatenation is W₁·CLIP + Σ W_l·routed_l; the residual form is that with the level blocks factored
through the tower's width (W₁·(CLIP + Σ P_l·…)), so the routed levels still reach every projector unit.

The paper writes "weighted levels -> LN -> MLP". Taken literally the LayerNorm would divide the scalar
weight w_l right out again (LN(w·x) = LN(x)), making the router a no-op; the weight is therefore applied
after LN and MLP, which is the only order in which it can matter.

`mode="constant"` replaces the learned weights by a fixed equal weight (sigmoid(0) = 0.5, the soft
router's neutral value) for the paper's constant-weights ablation; everything else is identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from encoders.towers import VisionFeatures

__all__ = ["ROUTER_MERGES", "ROUTER_MODES", "FeatureRouter", "RouterOutput"]

ROUTER_MODES = ("soft", "constant")
ROUTER_MERGES = ("concat", "residual")


@dataclass
class RouterOutput:
    # concat: [B, N, (1 + L) * D], CLIP tokens then each routed level; residual: [B, N, D]
    tokens: torch.Tensor
    weights: torch.Tensor  # [B, L] routing weights in (0, 1)


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class FeatureRouter(nn.Module):
    """Route `num_levels` feature maps of width `level_dim` onto a CLIP grid of width `clip_dim`."""

    def __init__(
        self,
        clip_dim: int,
        level_dim: int,
        num_levels: int,
        mode: str = "soft",
        constant_weight: float = 0.5,
        merge: str = "concat",
    ) -> None:
        super().__init__()
        if mode not in ROUTER_MODES:
            raise ValueError(f"router mode must be one of {ROUTER_MODES}, got {mode!r}")
        if merge not in ROUTER_MERGES:
            raise ValueError(f"router merge must be one of {ROUTER_MERGES}, got {merge!r}")
        if num_levels < 1:
            raise ValueError(f"the router needs at least one level, got {num_levels}")
        self.clip_dim, self.level_dim, self.num_levels = clip_dim, level_dim, num_levels
        self.mode, self.merge = mode, merge
        self.constant_weight = float(constant_weight)
        d = clip_dim
        self.level_mlps = nn.ModuleList([_mlp(level_dim, d, d) for _ in range(num_levels)])
        if mode == "soft":  # constant weights have no gate: no parameters that never see a gradient
            self.context = nn.ModuleList([nn.Linear(d, d) for _ in range(num_levels)])
            self.norm_clip = nn.LayerNorm(d)
            self.norm_context = nn.LayerNorm(d)
            self.gate = _mlp(2 * d, d, 1)
        self.post_norm = nn.LayerNorm(d)
        self.post_mlp = _mlp(d, d, d)
        if merge == "residual":  # the routed branch starts silent: CLIP's tokens pass through unchanged
            nn.init.zeros_(self.post_mlp[-1].weight)
            nn.init.zeros_(self.post_mlp[-1].bias)

    @property
    def out_dim(self) -> int:
        """Width of the tokens the projector receives."""
        return self.clip_dim if self.merge == "residual" else (1 + self.num_levels) * self.clip_dim

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode}, merge={self.merge}, levels={self.num_levels}, "
            f"level_dim={self.level_dim}, clip_dim={self.clip_dim}"
        )

    def forward(self, clip: VisionFeatures, levels: Sequence[torch.Tensor]) -> RouterOutput:
        if len(levels) != self.num_levels:
            raise ValueError(f"router built for {self.num_levels} levels, got {len(levels)}")
        tokens = clip.tokens
        b, n, d = tokens.shape
        gh, gw = clip.grid
        if n != gh * gw:
            raise ValueError(
                f"router needs patch tokens only ({gh}x{gw}={gh * gw}), got {n}; use select_feature=patch"
            )
        dtype = self.post_norm.weight.dtype
        tokens = tokens.to(dtype)
        pooled_clip = self.norm_clip(tokens.mean(dim=1)) if self.mode == "soft" else None  # [B, D]
        routed, weights = [], []
        for i, fmap in enumerate(levels):
            if fmap.shape[1] != self.level_dim:
                raise ValueError(
                    f"level {i} has {fmap.shape[1]} channels, the router expects {self.level_dim}"
                )
            grid_map = F.interpolate(fmap.to(dtype), size=(gh, gw), mode="bilinear", align_corners=False)
            feats = self.level_mlps[i](grid_map.flatten(2).transpose(1, 2))  # [B, N, D]
            if self.mode == "soft":
                ctx = self.norm_context(self.context[i](feats.mean(dim=1)))
                w = torch.sigmoid(self.gate(torch.cat([pooled_clip, ctx], dim=-1)))  # [B, 1]
            else:
                w = torch.full((b, 1), self.constant_weight, dtype=dtype, device=tokens.device)
            routed.append(w.unsqueeze(1) * self.post_mlp(self.post_norm(feats)))
            weights.append(w)
        merged = tokens + sum(routed) if self.merge == "residual" else torch.cat([tokens, *routed], dim=-1)
        return RouterOutput(merged, torch.cat(weights, dim=-1))
