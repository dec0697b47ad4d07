"""`model.encoder.coca` of a contrastive recipe: CoCa's captioning decoder and SyCoCa's TG-MIM head.

Plain dataclasses with no model code, so `encoders.contrastive.EncoderConfig` can type its `coca` field
with them (the model, `encoders.coca`, builds on `encoders.contrastive` and cannot be imported there).
Every bad value is refused when the recipe loads, in one line naming its key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from encoders.common import ConfigError

WHERE = "model.encoder.coca"
MASK_SELECTIONS = ("most", "least", "random")


def _number(where: str, value: Any, lo: float, hi: float | None = None, *, open_lo=False, open_hi=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if open_lo else value >= lo) and (
            hi is None or (value < hi if open_hi else value <= hi)
        )
    if not ok:
        left = "(" if open_lo else "["
        right = "inf)" if hi is None else (f"{hi})" if open_hi else f"{hi}]")
        raise ConfigError(f"{where} must be a number in {left}{lo}, {right}, got {value!r}")


def _count(where: str, value: Any, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f"{where} must be an integer >= {least}, got {value!r}")


@dataclass
class MimConfig:
    """`model.encoder.coca.mim`: SyCoCa's text-guided masked image modelling (TG-MIM) head.

    weight: λ_mim. mask_ratio: the share of patch tokens masked (at least one patch is masked and one is
    kept). select: which patches attentive masking masks: `most` (default) the patches most similar to the
    caption's embedding (the text then carries what is needed to rebuild them), `least` the least similar,
    `random` a uniform draw (the plain-MIM control). layers / heads: the image decoder. norm_pix: MAE's
    per-patch normalised pixel target.
    """

    weight: float = 1.0
    mask_ratio: float = 0.5
    select: str = "most"
    layers: int = 2
    heads: int = 4
    norm_pix: bool = True

    def __post_init__(self) -> None:
        w = f"{WHERE}.mim"
        _number(f"{w}.weight", self.weight, 0.0)
        _number(f"{w}.mask_ratio", self.mask_ratio, 0.0, 1.0, open_lo=True, open_hi=True)
        if self.select not in MASK_SELECTIONS:
            raise ConfigError(f"{w}.select must be one of {MASK_SELECTIONS}, got {self.select!r}")
        _count(f"{w}.layers", self.layers, 1)
        _count(f"{w}.heads", self.heads, 1)


@dataclass
class CocaConfig:
    """`model.encoder.coca`: turns a contrastive pair into CoCa (and, with `mim`, SyCoCa).

    L = contrastive_weight · L_objective + caption_weight · L_caption (+ mim.weight · L_mim); CoCa's
    weights are 1 and 2. n_queries: the captioning pooler's learned queries (the paper's 256; the
    contrastive pooler has one). heads: attention heads of both poolers and the multimodal layers.
    multimodal_layers: decoder layers with cross-attention; None: as many as the text tower has (CoCa
    splits its decoder half unimodal, half multimodal). label_smoothing: of the caption cross entropy.
    With `coca`, `model.encoder.image_pool` is not used: the image embedding is the pooler's one query.
    """

    contrastive_weight: float = 1.0
    caption_weight: float = 2.0
    n_queries: int = 256
    heads: int = 4
    multimodal_layers: int | None = None
    label_smoothing: float = 0.0
    mim: MimConfig | None = None

    def __post_init__(self) -> None:
        _number(f"{WHERE}.contrastive_weight", self.contrastive_weight, 0.0)
        _number(f"{WHERE}.caption_weight", self.caption_weight, 0.0)
        _count(f"{WHERE}.n_queries", self.n_queries, 1)
        _count(f"{WHERE}.heads", self.heads, 1)
        if self.multimodal_layers is not None:
            _count(f"{WHERE}.multimodal_layers", self.multimodal_layers, 1)
        _number(f"{WHERE}.label_smoothing", self.label_smoothing, 0.0, 1.0, open_hi=True)
        if isinstance(self.mim, dict):  # built in code rather than from a recipe
            self.mim = MimConfig(**self.mim)

    def check_objective(self, objective: Any) -> None:
        """CoCa's contrastive term takes the pooled image and text embeddings only: an objective that
        needs token features or hard negatives (FILIP, NegCLIP) has nothing to read here."""
        needs = sorted(getattr(objective, "needs", ()) or ())
        for hook in ("make_state", "embed_tokens"):  # an objective with its own parameters or pooling (FDT)
            if getattr(objective, hook, None) is not None:
                needs.append(hook)
        if needs:
            raise ConfigError(
                f"{WHERE}: CoCa contrasts its pooled embeddings; objective {objective.name!r} needs "
                f"{needs} (use clip, siglip, dcl, convirt, ...)"
            )
