"""CG-VLM (Liu et al. 2023, "Contrastive Vision-Language Alignment Makes Efficient Instruction Learner"):
the `align` stage trains the projector with a contrastive loss beside the next-token (captioning) loss.

    L = L_gen + weight * L_con,   L_con = CLIP's symmetric InfoNCE at 1/temperature between
    v_i = normalise(mean_n P(x_i)_n)   (the image's projected tokens, average-pooled) and
    t_i = normalise(mean_{k in caption_i} E(w_k))   (the caption's tokens as the LM embeds them)

over the batch's (image, caption) pairs. CG-VLM's point is that the projected patches must land near the
LM's own token embeddings, not only make the captions likely; with no patch-token grounding available it
maximises the similarity of the pooled patches and the pooled token embeddings (the abstract's "averaged
similarity between pooled image-patch features and text-token embeddings").

Implemented form: E is the LM's input embedding table (frozen in `align`, so only the projector moves), the
caption tokens are the labelled positions of the sample (the `plain` template labels exactly the caption),
and the temperature is fixed (no new learnable parameter in the saved model). The contrastive term is
`encoders.objectives`' `clip` entry, so it has that entry's distributed form (the other ranks' pairs as
negatives). weight 0 (or no `cgvlm:` section) is the plain `align` stage, bit for bit: the model is then
trained unwrapped.

`CgVlmAlign` is the module the stage trains: the model's children under their own names (trainable
prefixes, checkpoints and the saved model are the model's own), the projector's output read by a forward
hook during the model's own forward pass (no second tower or projector pass; the frozen-tower feature cache
and a fused router work unchanged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.common import ConfigError
from encoders.objectives import get_objective
from mllm.chat import IGNORE_INDEX

if TYPE_CHECKING:
    from mllm.model import MultimodalLM

__all__ = ["CgVlmAlign", "CgVlmConfig", "CgVlmOutput", "cgvlm_loss", "pooled_pair", "with_cgvlm"]


@dataclass
class CgVlmConfig:
    """An `align` stage's CG-VLM settings (the stage's `cgvlm:` section; checked when the recipe loads).

    weight: the contrastive term's weight (>= 0; 0 = the plain align stage).
    temperature: the InfoNCE temperature (> 0; the logit scale is 1/temperature).
    """

    weight: float = 1.0
    temperature: float = 0.07

    def __post_init__(self) -> None:
        for key, lo_open in (("weight", False), ("temperature", True)):
            v = getattr(self, key)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or v < 0 or (lo_open and v == 0):
                need = "a positive number" if lo_open else "a number >= 0"
                raise ConfigError(f"cgvlm.{key} must be {need}, got {v!r}")


def pooled_pair(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, t): the mean of each image's tokens [n, N, D] -> [n, D] and the masked mean of each row's token
    embeddings [B, T, D] -> [B, D], both L2-normalised, in float32 (float64 kept)."""
    acc = torch.float64 if image_embeds.dtype == torch.float64 else torch.float32
    mask = text_mask.to(acc)[..., None]
    count = mask.sum(1)
    if bool((count == 0).any()):
        raise ValueError("CG-VLM: a sample has no caption tokens (no labelled position) to pool")
    v = F.normalize(image_embeds.to(acc).mean(1), dim=-1)
    t = F.normalize((text_embeds.to(acc) * mask).sum(1) / count, dim=-1)
    return v, t


def cgvlm_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_con: symmetric InfoNCE at scale 1/temperature between the pooled image tokens and the pooled
    caption token embeddings (row i of each is pair i). Returns the loss and the objective's statistics."""
    v, t = pooled_pair(image_embeds, text_embeds, text_mask)
    if v.shape[0] != t.shape[0]:
        raise ValueError(
            f"CG-VLM pairs one image with one caption per sample: {v.shape[0]} images, {t.shape[0]} rows"
        )
    scale = torch.full((1,), 1.0 / temperature, dtype=v.dtype, device=v.device)
    return get_objective("clip")(v, t, scale)


@dataclass
class CgVlmOutput:
    loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    num_loss_tokens: int = 0


class CgVlmAlign(nn.Module):
    """The module an `align` stage with CG-VLM trains (see the module docstring)."""

    def __init__(self, model: MultimodalLM, cfg: CgVlmConfig):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        self.__dict__["model"] = model
        self.cfg = cfg

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kw: Any,
    ) -> Any:
        model: MultimodalLM = self.__dict__["model"]
        if self.cfg.weight == 0:
            return model(input_ids, attention_mask, labels=labels, position_ids=position_ids, **kw)
        if labels is None:
            raise ValueError("CG-VLM needs labels: the caption is the labelled positions")
        if attention_mask is None and position_ids is not None:
            raise ValueError("CG-VLM pools one caption per row; packed rows (data.packing) hold several")
        captured: list[torch.Tensor] = []
        hook = model.projector.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            out = model(input_ids, attention_mask, labels=labels, position_ids=position_ids, **kw)
        finally:
            hook.remove()
        if len(captured) != 1:
            raise ValueError(
                f"CG-VLM reads the projector's output once per batch; it ran {len(captured)} times "
                "(a model whose projector is not one module call, or a batch without images)"
            )
        caption = labels != IGNORE_INDEX
        emb = model.lm.get_input_embeddings()(input_ids.masked_fill(~caption, 0))
        con, stats = cgvlm_loss(captured[0], emb, caption, self.cfg.temperature)
        loss = out.loss + self.cfg.weight * con.to(out.loss.dtype)
        stats = {
            "loss_lm": out.loss.detach(),
            "loss_con": con.detach(),
            "acc_i2t": stats["acc_i2t"],
            "acc_t2i": stats["acc_t2i"],
        }
        return CgVlmOutput(loss, stats, out.num_loss_tokens)


def with_cgvlm(model: MultimodalLM, cfg: CgVlmConfig | None) -> nn.Module:
    """The module the stage trains: `model` itself without CG-VLM (no section, or weight 0), else wrapped."""
    return model if cfg is None or cfg.weight == 0 else CgVlmAlign(model, cfg)
