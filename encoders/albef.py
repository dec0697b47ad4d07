"""ALBEF (Li et al. 2021, "Align before Fuse: Vision and Language Representation Learning with Momentum
Distillation") on the contrastive pair: model kind `albef`.

ALBEF aligns the unimodal embeddings *before* fusing them, then trains a fusion encoder on top:

- **ITC**, image-text contrast of the unimodal [CLS] embeddings against the *momentum* model's embeddings
  (MoCo-style keys, as the paper's s(I, T) = g_v(v_cls)ᵀ g'_w(w'_cls)), with soft targets:
  L_itc = ½ E[H(y^i2t, p^i2t) + H(y^t2i, p^t2i)], y = α·softmax(s·v'ᵀt') + (1 − α)·one-hot (`albef_itc`);
- **ITM**, image-text matching: a binary head on the fusion encoder's first token; each image meets one
  negative caption and each caption one negative image, drawn from the batch with probability
  softmax(ITC similarity) over the non-matching ones (`sample_itm_negatives`; the positive, and any row
  with the very same caption, is never drawn); L_itm = CE over B positives and 2B negatives;
- **MLM**, masked language modelling over the fusion encoder (BERT's 15 % with 80/10/10), the target mixed
  with the momentum model's prediction: L_mlm = (1 − α)·CE + α·H(softmax(momentum logits), p) (`albef_mlm`);
- **momentum distillation**: the momentum model is an EMA (`encoders.ema.EmaCopy`) of the image tower,
  text tower, heads and fusion encoder, updated after each optimiser step (`after_step`).

L = itc_weight·L_itc + itm_weight·L_itm + mlm_weight·L_mlm (all 1 in the paper). α = 0.4 and momentum 0.995
are the paper's; α ramps linearly from 0 over `alpha_warmup_steps` optimiser steps (the paper: its first
epoch).

What differs from the paper, and why:
- the text side is this project's causal CLIP text tower (its EOS-pooled output is the text embedding);
  the fusion encoder is its own `fusion_layers` bidirectional layers with cross-attention to the image
  tower's final tokens (torch's `TransformerDecoderLayer` without a causal mask: self-attention, cross-
  attention, MLP, as BERT's fusion layers), on the text tower's final token states;
- the feature queue is optional (`queue_size`, 0 by default: in-batch keys only; ALBEF keeps 65,536):
  at the tiny recipes' 100 steps a queue would hold embeddings of a model long gone; when on, it is
  filled in order (no random start as in ALBEF's code), and the ITM draws use the batch only, as ALBEF's;
- the tokenizer has no [MASK]: the tokenizer's mask token is used where there is one, else the pad
  token, whose embedding padding never reaches (padded keys are masked out), so it is a free row;
- the temperature is the pair's learnable logit scale (CLIP's bounds, clamped after each step);
- distributed, every term is rank-local (ITC's in-batch keys and ITM's negatives are this rank's batch),
  as in ALBEF; only the queue is filled with every rank's momentum embeddings, as ALBEF's is.

The saved folder is a contrastive pair folder (contrastive.json of kind `albef` + `albef.safetensors`), so
`mllm eval retrieval` / `mllm eval mmvp_vlm` and a MultimodalLM's `model.tower.path` read its towers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
from encoders.gather import gather_no_grad
from encoders.text_tower import TextTower
from encoders.towers import Tower

__all__ = [
    "AlbefConfig",
    "AlbefEncoderConfig",
    "AlbefModel",
    "FusionEncoder",
    "albef_itc",
    "albef_mlm",
    "is_albef_dir",
    "mask_tokens",
    "sample_itm_negatives",
    "soft_cross_entropy",
]

ALBEF_WEIGHTS = "albef.safetensors"
WHERE = "model.encoder.albef"


def _number(key: str, value: Any, lo: float, hi: float | None, *, hi_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value >= lo and (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        right = "inf)" if hi is None else (f"{hi})" if hi_open else f"{hi}]")
        raise ConfigError(f"{WHERE}.{key} must be a number in [{lo}, {right}, got {value!r}")


def _count(key: str, value: Any, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f"{WHERE}.{key} must be an integer >= {least}, got {value!r}")


@dataclass
class AlbefConfig:
    """`model.encoder.albef` of model kind `albef` (every value checked when the recipe loads)."""

    momentum: float = 0.995  # EMA momentum of the momentum model, in [0, 1)
    alpha: float = 0.4  # weight of the momentum model's soft targets (ITC and MLM), in [0, 1]
    alpha_warmup_steps: int = 0  # α ramps linearly from 0 over this many optimiser steps (0: constant)
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    mlm_prob: float = 0.15  # share of caption tokens masked for MLM, in (0, 1)
    fusion_layers: int = 2  # fusion-encoder layers (cross-attention to the image tokens)
    fusion_heads: int = 4  # attention heads of the fusion encoder; must divide the text tower's width
    queue_size: int = 0  # ALBEF's queues of earlier momentum embeddings as extra ITC keys (0: in-batch only)

    def __post_init__(self) -> None:
        try:
            check_momentum(self.momentum, f"{WHERE}.momentum")
        except ValueError as e:
            raise ConfigError(str(e)) from e
        _number("alpha", self.alpha, 0.0, 1.0)
        _count("alpha_warmup_steps", self.alpha_warmup_steps, 0)
        for key in ("itc_weight", "itm_weight", "mlm_weight"):
            _number(key, getattr(self, key), 0.0, None)
        if self.itc_weight + self.itm_weight + self.mlm_weight <= 0:
            raise ConfigError(f"{WHERE}: itc_weight, itm_weight and mlm_weight are all 0; nothing to train")
        _number("mlm_prob", self.mlm_prob, 0.0, 1.0, hi_open=True)
        if self.mlm_prob == 0:
            raise ConfigError(f"{WHERE}.mlm_prob must be in (0, 1), got 0 (set mlm_weight: 0 to drop MLM)")
        _count("fusion_layers", self.fusion_layers, 1)
        _count("fusion_heads", self.fusion_heads, 1)
        _count("queue_size", self.queue_size, 0)


def albef_config(raw: dict[str, Any] | None) -> AlbefConfig:
    return from_dict(AlbefConfig, raw or {}, WHERE)


@dataclass
class AlbefEncoderConfig(EncoderConfig):
    """`model.encoder` of model kind `albef`: the contrastive pair's settings plus `albef:`.

    ALBEF's ITC is its own soft-target InfoNCE, so `objective` stays `clip` (its hard-target form) with no
    `objective_args`; another objective would be silently unused, so it is refused."""

    albef: AlbefConfig = field(default_factory=AlbefConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective != "clip" or self.objective_args:
            raise ConfigError(
                "model.encoder.objective: model.kind albef trains ALBEF's own ITC (a soft-target clip), so "
                f"objective must be 'clip' with no objective_args, got {self.objective!r} {self.objective_args}"
            )
        if getattr(self, "coca", None) is not None:
            raise ConfigError("model.encoder.coca belongs to model.kind contrastive (CoCa), not albef")


# ---------------------------------------------------------------------------------------------- losses


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row: −Σ_j targets_ij · log softmax(logits_i)_j  ([N, C] → [N]), in float32 or wider."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    return -(F.log_softmax(logits.to(acc), dim=-1) * targets.to(acc)).sum(-1)


def albef_itc(
    img: torch.Tensor,
    txt: torch.Tensor,
    img_m: torch.Tensor,
    txt_m: torch.Tensor,
    scale: torch.Tensor,
    alpha: float,
    img_queue: torch.Tensor | None = None,
    txt_queue: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ALBEF's ITC with momentum distillation.

    img, txt: the student's normalised embeddings [B, E]; img_m, txt_m: the momentum model's (no gradient);
    img_queue, txt_queue: [Q, E] earlier momentum embeddings (ALBEF's queues; None: in-batch keys only).
    Keys: T' = [txt_m; txt_queue], I' = [img_m; img_queue].
    p^i2t_i = softmax_j(s·img_i·T'_j), p^t2i_i = softmax_j(s·txt_i·I'_j);
    y^i2t_i = α·softmax_j(s·img_m_i·T'_j) + (1 − α)·δ_ij (and alike for t2i);
    L = ½ mean_i [H(y^i2t_i, p^i2t_i) + H(y^t2i_i, p^t2i_i)]."""
    b = img.shape[0]
    keys_t = txt_m.detach() if txt_queue is None else torch.cat([txt_m.detach(), txt_queue.to(txt_m.dtype)])
    keys_i = img_m.detach() if img_queue is None else torch.cat([img_m.detach(), img_queue.to(img_m.dtype)])
    s = scale.reshape(())
    sim_i2t = s * img @ keys_t.T
    sim_t2i = s * txt @ keys_i.T
    eye = torch.eye(b, keys_t.shape[0], device=img.device, dtype=torch.float32)
    with torch.no_grad():
        s_m = s.detach().float()
        tgt_i2t = (
            alpha * F.softmax(s_m * img_m.detach().float() @ keys_t.float().T, dim=1) + (1 - alpha) * eye
        )
        tgt_t2i = (
            alpha * F.softmax(s_m * txt_m.detach().float() @ keys_i.float().T, dim=1) + (1 - alpha) * eye
        )
    l_i2t = soft_cross_entropy(sim_i2t, tgt_i2t).mean()
    l_t2i = soft_cross_entropy(sim_t2i, tgt_t2i).mean()
    labels = torch.arange(img.shape[0], device=img.device)
    stats = {
        "itc_i2t": l_i2t.detach(),
        "itc_t2i": l_t2i.detach(),
        "acc_i2t": (sim_i2t.detach().argmax(1) == labels).float().mean(),
        "acc_t2i": (sim_t2i.detach().argmax(1) == labels).float().mean(),
    }
    return (l_i2t + l_t2i) / 2, stats


def itm_negative_weights(sim: torch.Tensor, same: torch.Tensor | None = None) -> torch.Tensor:
    """Sampling weights of ALBEF's hard negatives: softmax(sim) per row + 1e-5 (so every other row can be
    drawn), 0 on the diagonal (the positive) and wherever `same` [B, B] is true (a row with the very same
    caption: a false negative)."""
    w = F.softmax(sim.detach().float(), dim=1) + 1e-5
    off = ~torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    if same is not None:
        off &= ~same.to(sim.device)
    return w * off


def sample_itm_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    same: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One hard negative per image and per caption, from the in-batch ITC similarities [B, B] (sim_i2t:
    image rows, caption columns; sim_t2i: caption rows, image columns).

    Returns (img_rows, neg_txt, txt_rows, neg_img): image `img_rows[k]` is paired with caption
    `neg_txt[k]`, caption `txt_rows[k]` with image `neg_img[k]`. A row with nothing to draw (a batch of one,
    or only identical captions) gets no negative."""
    out = []
    for sim in (sim_i2t, sim_t2i):
        w = itm_negative_weights(sim, same)
        rows = torch.nonzero(w.sum(1) > 0).flatten()
        if rows.numel():
            picks = torch.multinomial(w[rows].cpu(), 1, generator=generator).flatten().to(sim.device)
        else:
            picks = rows.clone()
        out += [rows, picks]
    img_rows, neg_txt, txt_rows, neg_img = out
    return img_rows, neg_txt, txt_rows, neg_img


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prob: float,
    mask_id: int,
    vocab_size: int,
    special_ids: set[int],
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: each real, non-special token is chosen with probability `prob`; a chosen token
    becomes `mask_id` (80 %), a random token (10 %) or stays (10 %). Returns (masked ids, labels) with
    labels −100 where nothing is predicted. At least one token is chosen when any can be (an empty MLM
    batch would have no loss)."""
    ids = input_ids.clone()
    cand = attention_mask.bool().clone()
    for s in special_ids:
        cand &= input_ids != s
    u = torch.rand(ids.shape, generator=generator).to(ids.device)
    chosen = cand & (u < prob)
    if not chosen.any() and cand.any():
        flat = torch.nonzero(cand.flatten()).flatten()
        k = flat[torch.randint(flat.numel(), (1,), generator=generator).to(flat.device)]
        chosen.view(-1)[k] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    how = torch.rand(ids.shape, generator=generator).to(ids.device)
    ids[chosen & (how < 0.8)] = mask_id
    rand = chosen & (how >= 0.8) & (how < 0.9)
    ids[rand] = torch.randint(vocab_size, ids.shape, generator=generator).to(ids.device)[rand]
    return ids, labels


def albef_mlm(
    logits: torch.Tensor, labels: torch.Tensor, logits_m: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """(1 − α)·CE(logits, labels) + α·H(softmax(logits_m), softmax(logits)), both averaged over the
    predicted positions (labels ≠ −100). logits [B, T, V]; logits_m: the momentum model's (None: α = 0)."""
    keep = labels != -100
    if not keep.any():
        return logits.sum() * 0.0
    lg = logits[keep].float()
    ce = F.cross_entropy(lg, labels[keep])
    if logits_m is None or alpha == 0:
        return ce
    distill = soft_cross_entropy(lg, F.softmax(logits_m[keep].detach().float(), dim=-1)).mean()
    return (1 - alpha) * ce + alpha * distill


# ----------------------------------------------------------------------------------------------- model


class FusionEncoder(nn.Module):
    """Text token states [B, T, D] attending to image tokens [B, N, D_img]: `layers` pre-norm layers of
    bidirectional self-attention (padding masked), cross-attention and an MLP; then a LayerNorm."""

    def __init__(self, text_dim: int, image_dim: int, layers: int, heads: int):
        super().__init__()
        if text_dim % heads:
            raise ValueError(
                f"{WHERE}.fusion_heads {heads} does not divide the text tower's width {text_dim}"
            )
        self.image_in = nn.Linear(image_dim, text_dim)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(
                text_dim,
                heads,
                4 * text_dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(text_dim)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        memory = self.image_in(image.to(self.image_in.weight.dtype))
        pad = ~text_mask.bool()
        x = text
        for layer in self.layers:
            x = layer(x, memory, tgt_key_padding_mask=pad)
        return self.norm(x)


class AlbefParts(nn.Module):
    """What ALBEF adds to the pair: the fusion encoder, the ITM head and the MLM head (one trainable prefix)."""

    def __init__(self, text_dim: int, image_dim: int, vocab: int, cfg: AlbefConfig):
        super().__init__()
        self.fusion = FusionEncoder(text_dim, image_dim, cfg.fusion_layers, cfg.fusion_heads)
        self.itm_head = nn.Linear(text_dim, 2)
        self.mlm_head = nn.Sequential(
            nn.Linear(text_dim, text_dim), nn.GELU(), nn.LayerNorm(text_dim), nn.Linear(text_dim, vocab)
        )


@dataclass
class AlbefOutput:
    loss: torch.Tensor
    stats: dict[str, torch.Tensor | float]


class AlbefModel(ContrastiveModel):
    """ContrastiveModel + fusion encoder, ITM and MLM heads + an EMA momentum model of all of them."""

    KIND = "albef"

    def __init__(
        self,
        image_tower: Tower,
        text_tower: TextTower,
        cfg: EncoderConfig,
        heads: ContrastiveHeads | None = None,
        albef: AlbefConfig | None = None,
    ):
        super().__init__(image_tower, text_tower, cfg, heads)
        self.albef_cfg = albef or AlbefConfig()
        tok = text_tower.tokenizer
        self.vocab_size = int(text_tower.model.get_input_embeddings().num_embeddings)
        self.mask_id = int(
            tok.mask_token_id if getattr(tok, "mask_token_id", None) is not None else tok.pad_token_id
        )
        self.special_ids = {int(i) for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)}
        self.albef = AlbefParts(
            text_tower.hidden_size, image_tower.output_size, self.vocab_size, self.albef_cfg
        )
        self.momentum = EmaCopy(self, ("image_tower", "text_tower", "heads", "albef"))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # optimiser steps (α warm-up)
        # ALBEF's queues (momentum embeddings of earlier batches, all ranks'), filled in order, then circular
        q, e = self.albef_cfg.queue_size, cfg.embed_dim
        self.register_buffer("image_queue", torch.zeros(q, e))
        self.register_buffer("text_queue", torch.zeros(q, e))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_contrastive(cls, base: ContrastiveModel, albef: AlbefConfig) -> AlbefModel:
        return cls(base.image_tower, base.text_tower, base.cfg, base.heads, albef)

    def alpha(self) -> float:
        """α now: the configured one, ramped linearly over the first `alpha_warmup_steps` steps."""
        cfg = self.albef_cfg
        if cfg.alpha_warmup_steps <= 0:
            return float(cfg.alpha)
        return float(cfg.alpha) * min(1.0, int(self.steps) / cfg.alpha_warmup_steps)

    def queued(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The filled part of the queues (None, None when there is no queue or it is still empty)."""
        n = int(self.queue_filled)
        return (None, None) if n == 0 else (self.image_queue[:n], self.text_queue[:n])

    @torch.no_grad()
    def enqueue(self, img_m: torch.Tensor, txt_m: torch.Tensor) -> None:
        """Write every rank's momentum embeddings of this micro-batch into the queues (as ALBEF does after
        each forward), oldest overwritten first; the queues stay identical on every rank."""
        q = self.image_queue.shape[0]
        if q == 0:
            return
        img_all, txt_all = (
            gather_no_grad(img_m.detach(), "img_m")[-q:],
            gather_no_grad(txt_m.detach(), "txt_m")[-q:],
        )
        idx = (int(self.queue_ptr) + torch.arange(img_all.shape[0])) % q
        self.image_queue[idx.to(self.image_queue.device)] = img_all.to(self.image_queue.dtype)
        self.text_queue[idx.to(self.text_queue.device)] = txt_all.to(self.text_queue.dtype)
        self.queue_ptr.fill_((int(self.queue_ptr) + img_all.shape[0]) % q)
        self.queue_filled.fill_(min(q, int(self.queue_filled) + img_all.shape[0]))

    def after_step(self) -> None:
        """The pair's logit-scale clamp, then the momentum model's EMA update (after each optimiser step)."""
        super().after_step()
        self.momentum.update(self.albef_cfg.momentum)
        self.steps += 1

    # -- the three encoders, each a method so the momentum model runs the very same code (EmaCopy.call)
    def image_parts(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised embedding [B, E] = `encode_image`, final tokens [B, prefix + N, D_img])."""
        hidden, pooled = self.image_tower.final_outputs(pixel_values)
        patches = hidden[:, self.image_tower.num_prefix_tokens :]
        if self.cfg.image_pool == "mean" or pooled is None:
            pooled = patches.mean(1)
        return F.normalize(self.heads.image_proj(pooled), dim=-1), hidden

    def text_parts(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised embedding [B, E] = `encode_text`, final token states [B, T, D])."""
        pooled, hidden = self.text_tower(input_ids, attention_mask)
        return F.normalize(self.heads.text_proj(pooled), dim=-1), hidden

    def mlm_logits(self, masked_ids: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor):
        _, hidden = self.text_tower(masked_ids, attention_mask)
        return self.albef.mlm_head(self.albef.fusion(hidden, attention_mask, image_tokens))

    def momentum_outputs(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, masked_ids
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image embedding, text embedding, MLM logits) of one model: run on the EMA weights."""
        img, tokens = self.image_parts(pixel_values)
        txt, _ = self.text_parts(input_ids, attention_mask)
        return img, txt, self.mlm_logits(masked_ids, attention_mask, tokens)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any
    ) -> AlbefOutput:
        cfg, alpha = self.albef_cfg, self.alpha()
        attention_mask = attention_mask.to(input_ids.device)
        img, img_tokens = self.image_parts(pixel_values)
        txt, txt_hidden = self.text_parts(input_ids, attention_mask)
        scale = self.logit_scale()
        masked_ids, mlm_labels = mask_tokens(
            input_ids, attention_mask, cfg.mlm_prob, self.mask_id, self.vocab_size, self.special_ids
        )
        img_m, txt_m, logits_m = self.momentum.call(
            self.momentum_outputs, pixel_values, input_ids, attention_mask, masked_ids
        )
        l_itc, stats = albef_itc(img, txt, img_m, txt_m, scale, alpha, *self.queued())
        self.enqueue(img_m, txt_m)

        # ITM: B positives, then each image with a drawn caption and each caption with a drawn image
        b = img.shape[0]
        same = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1)  # identical captions (padded alike)
        with torch.no_grad():
            sim_i2t, sim_t2i = scale * img @ txt_m.T, scale * txt @ img_m.T
        img_rows, neg_txt, txt_rows, neg_img = sample_itm_negatives(sim_i2t, sim_t2i, same)
        fusion = self.albef.fusion
        text_in = torch.cat([txt_hidden, txt_hidden[neg_txt], txt_hidden[txt_rows]])
        mask_in = torch.cat([attention_mask, attention_mask[neg_txt], attention_mask[txt_rows]])
        image_in = torch.cat([img_tokens, img_tokens[img_rows], img_tokens[neg_img]])
        itm_logits = self.albef.itm_head(fusion(text_in, mask_in, image_in)[:, 0])
        itm_labels = torch.zeros(itm_logits.shape[0], dtype=torch.long, device=itm_logits.device)
        itm_labels[:b] = 1
        l_itm = F.cross_entropy(itm_logits.float(), itm_labels)

        logits = self.mlm_logits(masked_ids, attention_mask, img_tokens)
        l_mlm = albef_mlm(logits, mlm_labels, logits_m, alpha)

        loss = cfg.itc_weight * l_itc + cfg.itm_weight * l_itm + cfg.mlm_weight * l_mlm
        stats.update(
            itc=l_itc.detach(),
            itm=l_itm.detach(),
            mlm=l_mlm.detach(),
            itm_acc=(itm_logits.detach().argmax(1) == itm_labels).float().mean(),
            alpha=alpha,
            scale=scale.detach().reshape(()),
        )
        return AlbefOutput(loss, stats)

    # -- persistence ---------------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {**super().meta(), "albef": asdict(self.albef_cfg)}

    def _own(self) -> list[str]:
        extra = ("steps", "image_queue", "text_queue", "queue_ptr", "queue_filled")
        return [k for k in self.state_dict() if k.startswith(("albef.", "momentum.")) or k in extra]

    def write_parts(self, folder: Path) -> None:
        """The pair's files (contrastive.json of kind `albef` with its `albef` section) + albef.safetensors
        (fusion encoder, ITM and MLM heads, the momentum model, the step count)."""
        super().write_parts(folder)
        save_extension_weights(self, self._own(), folder / ALBEF_WEIGHTS)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> AlbefModel:
        model_dir = Path(model_dir)
        section = extension_section(model_dir, "albef")
        model = cls.from_contrastive(ContrastiveModel.from_pretrained(model_dir), albef_config(section))
        load_extension_weights(model, model._own(), model_dir / ALBEF_WEIGHTS)
        return model.eval()


def is_albef_dir(path: str | Path) -> bool:
    return is_extension_dir(path, "albef")
