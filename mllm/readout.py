"""Look tokens: a question-conditioned readout of the image, one embedding after each question.

Why: a LLaVA-style LM must find the object a question names among the image tokens by itself (the
answer position gathers the question's words, then attends to the patches that match them: two hops of
attention that a small LM learns only after thousands of steps; docs/results.md, "Models that see").
A look token does that first hop outside the LM, the way InstructBLIP's instruction-aware Q-Former
reads the image with the instruction: the question's words (a bag of the LM's own input embeddings)
query the image's pre-projector patch features, and the attention-pooled features, with how strongly
the best patches matched, become one more token at the end of the question. The LM then reads the
referent from one known place, as it does in a one-object scene.

Wire format: `mllm.chat.encode_conversation` appends `meta.look_token` to every user turn of a
conversation that has an image (`look_token=model.meta.look_token`), so training, evaluation, chat and
serving ask the same way. `MultimodalLM.embed` fills each look position from the most recent image in
its row; the question is the text since the previous look in the row (or the row start): the chat
template's own tokens there are constants that the query learns to ignore.

Variants live in `READOUTS` (name -> factory(feature_dim, lm_dim, **options)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from encoders.registry import Registry

__all__ = [
    "LOOK_TOKEN",
    "READOUTS",
    "FocusReadout",
    "build_readout",
    "check_readout",
    "grounding_loss",
    "look_inputs",
    "register_readout",
]

#: The placeholder a readout fills; the tokenizer holds it as one unsplittable special token.
LOOK_TOKEN = "<look>"

ReadoutFactory = Callable[..., nn.Module]
READOUTS: Registry[ReadoutFactory] = Registry("readout")


def register_readout(name: str) -> Callable[[ReadoutFactory], ReadoutFactory]:
    """Register a readout under `name`; its factory takes (feature_dim, lm_dim, **options)."""
    return READOUTS.register(name)


def build_readout(cfg: dict[str, Any], feature_dim: int, lm_dim: int) -> nn.Module:
    """The readout `cfg["type"]` with the rest of `cfg` as its options (errors name the key)."""
    opts = dict(cfg)
    name = opts.pop("type", None)
    if not isinstance(name, str):
        raise ValueError(
            f"model.readout.type must name a readout ({', '.join(READOUTS.known())}), got {name!r}"
        )
    try:
        return READOUTS[name](feature_dim, lm_dim, **opts)
    except TypeError as e:  # an option the readout does not take
        raise ValueError(f"model.readout: {e}") from None


def check_readout(cfg: Any, fused: bool) -> None:
    """Refuse a bad `model.readout` when the recipe loads (ConfigError naming the key), not at step 1."""
    from encoders.common import ConfigError

    if not isinstance(cfg, dict):
        raise ConfigError(f"model.readout must be a mapping such as {{type: focus}}, got {cfg!r}")
    if fused:
        raise ConfigError("model.readout is not supported with model.fusion (one tower's features only)")
    try:
        build_readout(cfg, 8, 8)
    except (ValueError, KeyError) as e:
        raise ConfigError(str(e)) from None


@register_readout("focus")
class FocusReadout(nn.Module):
    """Multi-head attention pooling of one image's patch features with a query made from the question.

    Per head h: s_p = <W_q LN(q), W_k LN(f_p)> / sqrt(d), a = softmax_p(s), v_h = sum_p a_p LN(f_p); the look
    embedding is MLP([v_1..v_H, max_p s, logsumexp_p s, sum_p sigmoid(s_p)]). The pooled *features*
    (not projected tokens) keep the tower's own code for colour, shape and position; the three match
    statistics say how well and how widely the question matched, which existence and counting need
    and a softmax average alone hides.
    """

    def __init__(
        self, feature_dim: int, lm_dim: int, heads: int = 4, dim: int = 64, ground: float = 0.0
    ) -> None:
        super().__init__()
        for key, value in (("heads", heads), ("dim", dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.readout.{key} must be a positive integer, got {value!r}")
        ok = isinstance(ground, (int, float)) and not isinstance(ground, bool) and math.isfinite(ground)
        if not ok or ground < 0:
            raise ValueError(f"model.readout.ground must be a number >= 0, got {ground!r}")
        self.heads, self.dim = heads, dim
        # weight of the grounding loss (training with `look_targets`): cross-entropy of the heads' mean
        # attention against the question's referent patches; 0 = the LM's answer alone teaches the look
        self.ground = float(ground)
        self.norm = nn.LayerNorm(feature_dim)
        # The question is a mean over a varying number of words: normalising it keeps the attention
        # logits' scale independent of the question's length (a 20-token mean is ~20x smaller than
        # the words that matter in it, which made the attention too flat to learn in a few hundred steps).
        self.qnorm = nn.LayerNorm(lm_dim)
        self.q = nn.Linear(lm_dim, heads * dim)
        self.k = nn.Linear(feature_dim, heads * dim)
        width = heads * (feature_dim + 3)
        self.out = nn.Sequential(nn.Linear(width, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))
        self.empty = nn.Parameter(torch.zeros(lm_dim))  # a look with no image before it

    def forward(
        self,
        features: torch.Tensor,
        queries: torch.Tensor,
        image_index: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """features [n_images, N, D]; queries [n_looks, d_lm]; image_index [n_looks] (-1: no image);
        targets [n_looks, N] (optional): each look's referent patches (an all-zero row: none).

        Returns the look embeddings [n_looks, d_lm] and, with targets, the grounding loss (else None)."""
        n = queries.shape[0]
        out = self.empty.to(queries.dtype).expand(n, -1).clone()
        has = image_index >= 0
        if not bool(has.any()):
            return out, None
        f = self.norm(features)[image_index[has]]  # [m, N, D]
        q = self.q(self.qnorm(queries[has])).view(-1, self.heads, 1, self.dim)  # [m, H, 1, d]
        k = self.k(f).view(f.shape[0], f.shape[1], self.heads, self.dim).transpose(1, 2)  # [m, H, N, d]
        s = (q * k).sum(-1) / math.sqrt(self.dim)  # [m, H, N]
        a = s.softmax(-1)
        pooled = torch.einsum("mhn,mnd->mhd", a, f)  # [m, H, D]
        stats = torch.stack(
            [s.amax(-1), torch.logsumexp(s, -1) - math.log(s.shape[-1]), torch.sigmoid(s).sum(-1)], -1
        )  # [m, H, 3]
        look = self.out(torch.cat([pooled, stats], -1).flatten(1))
        out[has] = look.to(out.dtype)
        if targets is None:
            return out, None
        return out, grounding_loss(a, targets[has].to(a.dtype))


def grounding_loss(attention: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the looks with a target of -sum_p t_p log(mean_h a_hp), t the target rows normalised to
    sum 1: the heads together should put their mass on the referents (how to share it is theirs).
    attention [m, H, N] (softmax over N), targets [m, N] >= 0. Zero (with a graph) when no row has one."""
    mass = targets.sum(-1)
    keep = mass > 0
    if not bool(keep.any()):
        return attention.sum() * 0.0
    t = targets[keep] / mass[keep, None]
    a = attention[keep].mean(1).clamp_min(1e-9)
    return -(t * a.log()).sum(-1).mean()


def look_inputs(
    input_ids: torch.Tensor,
    embeds: torch.Tensor,
    look_id: int,
    image_id: int,
    tokens_per_image: int,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every look position (row-major): its question query, its image's index, and the position mask.

    The query is the mean input embedding of the text positions after the previous look of the row (or
    the row start) up to the look itself, image and padding positions excluded. The image is the most
    recent one whose placeholders all precede the look (images are numbered in row-major order, the
    order `embed` scatters them in); -1 where the row has none before the look.
    """
    is_look = input_ids == look_id
    is_image = input_ids == image_id
    text = ~is_image & ~is_look
    if attention_mask is not None:
        text &= attention_mask.bool()
    w = text.to(embeds.dtype).unsqueeze(-1)
    csum = torch.cumsum(embeds * w, dim=1)  # [B, T, d]
    ccnt = torch.cumsum(w, dim=1)  # [B, T, 1]
    rows, cols = is_look.nonzero(as_tuple=True)
    here_s, here_c = csum[rows, cols], ccnt[rows, cols]
    # the previous look of the same row: shift the per-look values by one within each row
    prev_s, prev_c = torch.zeros_like(here_s), torch.zeros_like(here_c)
    same_row = torch.zeros_like(rows, dtype=torch.bool)
    if rows.numel() > 1:
        same_row[1:] = rows[1:] == rows[:-1]
    prev_s[1:] = torch.where(same_row[1:, None], here_s[:-1], prev_s[1:])
    prev_c[1:] = torch.where(same_row[1:, None], here_c[:-1], prev_c[1:])
    queries = (here_s - prev_s) / (here_c - prev_c).clamp_min(1.0)
    # image index: complete images before the look in its row, offset by the images of earlier rows
    img_before = torch.cumsum(is_image.long(), dim=1)[rows, cols] // tokens_per_image
    per_row = is_image.long().sum(1) // tokens_per_image
    offset = torch.cumsum(per_row, 0) - per_row
    index = torch.where(img_before > 0, offset[rows] + img_before - 1, torch.full_like(img_before, -1))
    return queries, index, is_look
