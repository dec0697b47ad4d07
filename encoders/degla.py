"""DeGLA (Hu et al. 2025, "Decoupled Global-Local Alignment for Improving Compositional Understanding") on the
contrastive pair: model kind `degla`.

Hard-negative fine-tuning (NegCLIP) teaches composition but pushes the negative captions away from the
images so hard that general ability drops. DeGLA decouples the two:

- **global alignment, kept by self-distillation**: the global contrastive loss over the batch, with each
  image's generated negative captions as extra image→text columns (NegCLIP's form, `degla_global`), plus a
  distillation term that keeps the student's embeddings near an EMA teacher's (`encoders.ema.EmaCopy` of
  the towers and heads, updated after each optimiser step):
  L_distill = Σ_i ‖v_i − v̄_i‖² + Σ_c ‖t_c − t̄_c‖² over the images and all captions, positives and
  negatives (`degla_distill`; a sum, as the authors' code takes it);
- **local alignment** with the generated negatives (here GeoWorld's attribute / relation / order swaps of
  the long caption, `n_negatives` of them per image, drawn per step):
  IGC, image-grounded: L_igc = −mean_i log softmax over [s·v_i·t_i, s·v_i·n_i1 … s·v_i·n_iK] at 0;
  TGC, text-grounded: L_tgc = −mean_i log softmax over [τ·t_i·t̄_i, τ·t_i·n_i1 … τ·t_i·n_iK] at 0, the
  caption anchored to the teacher's embedding of itself against its own negatives (`degla_igc`,
  `degla_tgc`).

L = L_global + igc_weight·L_igc + tgc_weight·L_tgc + distill_weight·L_distill. The weights (0.1, 0.1,
0.005), τ = 10 and the momentum 0.9996 are those of the authors' training script and loss code
(github.com/xiaoxing2001/DeGLA); they fine-tune a pre-trained CLIP, whose copy is the first teacher. The
abstract states the parts, not the formulas; these forms are the authors' code's, written anew here.

The saved folder is a contrastive pair folder (contrastive.json of kind `degla` + degla.safetensors with the
teacher), so `mllm eval retrieval` / `mmvp_vlm` and a MultimodalLM read its towers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from encoders.common import ConfigError, from_dict
from encoders.contrastive import (
    ContrastiveHeads,
    ContrastiveModel,
    EncoderConfig,
    extension_section,
    is_extension_dir,
    load_extension_weights,
    save_extension_weights,
)
from encoders.ema import EmaCopy, check_momentum
from encoders.gather import dist_info, gather_no_grad, gather_with_grad
from encoders.text_tower import TextTower
from encoders.towers import Tower

__all__ = [
    "DeglaConfig",
    "DeglaEncoderConfig",
    "DeglaModel",
    "degla_distill",
    "degla_global",
    "degla_igc",
    "degla_tgc",
    "is_degla_dir",
]

DEGLA_WEIGHTS = "degla.safetensors"
WHERE = "model.encoder.degla"
MAX_NEGATIVES = 3  # GeoWorld's negative kinds per caption: attribute, relation, order


def _number(key: str, value: Any, lo: float, *, open_lo: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < lo or (open_lo and value == lo):
        raise ConfigError(f"{WHERE}.{key} must be a number {'>' if open_lo else '>='} {lo}, got {value!r}")


@dataclass
class DeglaConfig:
    """`model.encoder.degla` of model kind `degla` (every value checked when the recipe loads)."""

    momentum: float = 0.9996  # EMA momentum of the teacher, in [0, 1)
    n_negatives: int = 3  # generated negative captions per image per step, 1..3 (GeoWorld's kinds)
    igc_weight: float = 0.1
    tgc_weight: float = 0.1
    distill_weight: float = 0.005
    tgc_scale: float = 10.0  # the fixed logit scale of TGC (the authors')

    def __post_init__(self) -> None:
        try:
            check_momentum(self.momentum, f"{WHERE}.momentum")
        except ValueError as e:
            raise ConfigError(str(e)) from e
        n = self.n_negatives
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_NEGATIVES:
            raise ConfigError(
                f"{WHERE}.n_negatives must be an integer in [1, {MAX_NEGATIVES}] (GeoWorld writes one "
                f"attribute, relation and order negative per caption), got {n!r}"
            )
        for key in ("igc_weight", "tgc_weight", "distill_weight"):
            _number(key, getattr(self, key), 0.0)
        _number("tgc_scale", self.tgc_scale, 0.0, open_lo=True)


def degla_config(raw: dict[str, Any] | None) -> DeglaConfig:
    return from_dict(DeglaConfig, raw or {}, WHERE)


@dataclass
class DeglaEncoderConfig(EncoderConfig):
    """`model.encoder` of model kind `degla`: the pair's settings plus `degla:`. The global term is DeGLA's
    own (CLIP with the negatives as columns), so `objective` stays `clip` with no `objective_args`."""

    degla: DeglaConfig = field(default_factory=DeglaConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective != "clip" or self.objective_args:
            raise ConfigError(
                "model.encoder.objective: model.kind degla trains DeGLA's own global loss (clip with the "
                f"negatives as columns), so objective must be 'clip' with no objective_args, got "
                f"{self.objective!r} {self.objective_args}"
            )
        if getattr(self, "coca", None) is not None:
            raise ConfigError("model.encoder.coca belongs to model.kind contrastive (CoCa), not degla")


# ---------------------------------------------------------------------------------------------- losses


def _acc(x: torch.Tensor) -> torch.Tensor:
    """float32, or wider when the input is (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _valid(neg: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    return torch.ones(neg.shape[:2], dtype=torch.bool, device=neg.device) if valid is None else valid.bool()


def degla_global(
    img: torch.Tensor,
    txt: torch.Tensor,
    neg: torch.Tensor,
    scale: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """½[CE_i2t + CE_t2i]: image→text over the columns [all captions; all valid negatives], text→image over
    the images. img, txt [B, E]; neg [B, K, E]; valid [B, K] (None: all). Distributed: this rank's rows
    against every rank's columns (`encoders.gather`), positives at column rank·B + i, as every objective
    of `encoders.objectives`."""
    rank, _ = dist_info()
    b = img.shape[0]
    s = scale.reshape(())
    txt_all = gather_with_grad(txt, "txt")
    neg_all = gather_with_grad(neg.reshape(b * neg.shape[1], -1), "negatives")
    ok_all = gather_no_grad(_valid(neg, valid).reshape(-1), "neg_valid")
    img_all = gather_with_grad(img, "img")
    labels = torch.arange(rank * b, rank * b + b, device=img.device)
    i2t = s * img @ torch.cat([txt_all, neg_all]).T
    cols = torch.cat(
        [torch.ones(txt_all.shape[0], dtype=torch.bool, device=img.device), ok_all.to(img.device)]
    )
    i2t = i2t.masked_fill(~cols[None], -torch.inf)
    t2i = s * txt @ img_all.T
    l_i2t = F.cross_entropy(_acc(i2t), labels)
    l_t2i = F.cross_entropy(_acc(t2i), labels)
    stats = {
        "global_i2t": l_i2t.detach(),
        "global_t2i": l_t2i.detach(),
        "acc_i2t": (i2t.detach().argmax(1) == labels).float().mean(),
        "acc_t2i": (t2i.detach().argmax(1) == labels).float().mean(),
    }
    return (l_i2t + l_t2i) / 2, stats


def _grounded(anchor, pos, neg, scale: torch.Tensor | float, valid: torch.Tensor | None):
    """−mean_i log softmax([s·a_i·p_i, s·a_i·n_i1 … s·a_i·n_iK])_0 over the valid negatives, and the share of
    rows ranking p first."""
    s = scale.reshape(()) if isinstance(scale, torch.Tensor) else scale
    logits = s * torch.cat([(anchor * pos).sum(-1, keepdim=True), torch.einsum("be,bke->bk", anchor, neg)], 1)
    keep = torch.cat([torch.ones_like(_valid(neg, valid)[:, :1]), _valid(neg, valid)], 1)
    logits = logits.masked_fill(~keep, -torch.inf)
    zero = torch.zeros(anchor.shape[0], dtype=torch.long, device=anchor.device)
    return F.cross_entropy(_acc(logits), zero), (logits.detach().argmax(1) == 0).float().mean()


def degla_igc(
    img: torch.Tensor,
    txt: torch.Tensor,
    neg: torch.Tensor,
    scale: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-grounded contrast: each image ranks its caption above its own K negatives [B, K, E] (the
    pair's learnable scale; `valid` [B, K] leaves fillers out). Returns (loss, accuracy)."""
    return _grounded(img, txt, neg, scale, valid)


def degla_tgc(
    txt: torch.Tensor,
    txt_teacher: torch.Tensor,
    neg: torch.Tensor,
    scale: float,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-grounded contrast: each caption is nearer the teacher's embedding of itself than its own K
    negatives, at a fixed scale. Returns (loss, accuracy)."""
    return _grounded(txt, txt_teacher.detach(), neg, scale, valid)


def degla_distill(
    student: list[torch.Tensor], teacher: list[torch.Tensor], rows: list[torch.Tensor | None] | None = None
) -> torch.Tensor:
    """Σ over each pair of [N, E] tensors of ‖student − teacher‖² (summed over rows and dimensions; `rows`:
    per pair, a [N] bool of the rows that count, or None for all)."""
    total = _acc(student[0].new_zeros(()))
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        sq = ((_acc(s) - _acc(t.detach())) ** 2).sum(-1)
        keep = None if rows is None else rows[i]
        total = total + (sq if keep is None else sq[keep.bool()]).sum()
    return total


# ----------------------------------------------------------------------------------------------- model


@dataclass
class DeglaOutput:
    loss: torch.Tensor
    stats: dict[str, torch.Tensor | float]


class DeglaModel(ContrastiveModel):
    """ContrastiveModel + an EMA teacher of its towers and heads; trained on captions with K negatives."""

    KIND = "degla"

    def __init__(
        self,
        image_tower: Tower,
        text_tower: TextTower,
        cfg: EncoderConfig,
        heads: ContrastiveHeads | None = None,
        degla: DeglaConfig | None = None,
    ):
        super().__init__(image_tower, text_tower, cfg, heads)
        self.degla_cfg = degla or DeglaConfig()
        self.teacher = EmaCopy(self, ("image_tower", "text_tower", "heads"))

    @classmethod
    def from_contrastive(cls, base: ContrastiveModel, degla: DeglaConfig) -> DeglaModel:
        return cls(base.image_tower, base.text_tower, base.cfg, base.heads, degla)

    def after_step(self) -> None:
        """The pair's logit-scale clamp, then the teacher's EMA update (after each optimiser step)."""
        super().after_step()
        self.teacher.update(self.degla_cfg.momentum)

    def embed_all(self, pixel_values, input_ids, attention_mask, neg_input_ids, neg_attention_mask):
        """(images [B, E], captions [B, E], negatives [B·K, E]), normalised; the teacher runs the same code."""
        return (
            self.encode_image(pixel_values),
            self.encode_text(input_ids, attention_mask),
            self.encode_text(neg_input_ids, neg_attention_mask),
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        neg_input_ids: torch.Tensor | None = None,
        neg_attention_mask: torch.Tensor | None = None,
        neg_valid: torch.Tensor | None = None,
        **_: Any,
    ) -> DeglaOutput:
        """neg_input_ids [B·K, T]: each image's K negative captions, image-major; neg_valid [B, K]: False
        for a filler (mllm.data.negatives)."""
        if neg_input_ids is None or neg_attention_mask is None:
            raise ValueError(
                "DeGLA needs negative captions in the batch (neg_input_ids; mllm.data.negatives)"
            )
        cfg = self.degla_cfg
        b = input_ids.shape[0]
        if neg_input_ids.shape[0] % b:
            raise ValueError(f"{neg_input_ids.shape[0]} negative captions for {b} images: not K per image")
        k = neg_input_ids.shape[0] // b
        inputs = (pixel_values, input_ids, attention_mask, neg_input_ids, neg_attention_mask)
        img, txt, neg = self.embed_all(*inputs)
        t_img, t_txt, t_neg = self.teacher.call(self.embed_all, *inputs)
        scale = self.logit_scale()
        neg3 = neg.reshape(b, k, -1)
        valid = None if neg_valid is None else neg_valid.to(img.device).bool()
        l_global, stats = degla_global(img, txt, neg3, scale, valid)
        l_igc, acc_igc = degla_igc(img, txt, neg3, scale, valid)
        l_tgc, acc_tgc = degla_tgc(txt, t_txt, neg3, cfg.tgc_scale, valid)
        rows = None if valid is None else valid.reshape(-1)
        l_distill = degla_distill([img, txt, neg], [t_img, t_txt, t_neg], [None, None, rows])
        loss = l_global + cfg.igc_weight * l_igc + cfg.tgc_weight * l_tgc + cfg.distill_weight * l_distill
        stats.update(
            global_loss=l_global.detach(),
            igc=l_igc.detach(),
            tgc=l_tgc.detach(),
            distill=l_distill.detach(),
            acc_igc=acc_igc,
            acc_tgc=acc_tgc,
            scale=scale.detach().reshape(()),
        )
        return DeglaOutput(loss, stats)

    # -- persistence ---------------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "degla": asdict(self.degla_cfg)}

    def _own(self) -> list[str]:
        return [k for k in self.state_dict() if k.startswith("teacher.")]

    def write_parts(self, folder: Path) -> None:
        """The pair's files (contrastive.json of kind `degla`) + degla.safetensors (the EMA teacher)."""
        super().write_parts(folder)
        save_extension_weights(self, self._own(), folder / DEGLA_WEIGHTS)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> DeglaModel:
        model_dir = Path(model_dir)
        section = extension_section(model_dir, "degla")
        model = cls.from_contrastive(ContrastiveModel.from_pretrained(model_dir), degla_config(section))
        load_extension_weights(model, model._own(), model_dir / DEGLA_WEIGHTS)
        return model.eval()


def is_degla_dir(path: str | Path) -> bool:
    return is_extension_dir(path, "degla")
