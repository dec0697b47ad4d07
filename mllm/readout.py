"""Look tokens: a question-conditioned readout of the image, one embedding after each question.

Why: a LLaVA-style LM must find the object a question names among the image tokens by itself (the
answer position gathers the question's words, then attends to the patches that match them: two hops of
attention that a small LM learns only after thousands of steps; docs/results.md, "Models that see").
A look token does that first hop outside the LM, the way InstructBLIP's instruction-aware Q-Former
reads the image with the instruction: the question's words (a bag of the LM's own input embeddings)
query the image's pre-projector patch features, and the attention-pooled features, with how strongly
the best patches matched, become one more token at the end of the question. The LM then reads the
referent from one known place, as it does in a one-object scene.

Wire format: `mllm.chat.encode_conversation` puts `meta.look_token` after every question of a
conversation that has an image (`at: question`, the default) or first in every reply (`at: answer`:
the position that predicts the answer's first word is then the look itself, so the LM need not learn
to fetch it from a few tokens back); `look_token=model.meta.look_token, look_at=look_at(meta.readout)`,
so training, evaluation, chat and serving ask the same way. `MultimodalLM.embed` fills each look
position from the most recent image in its row; the question is the text since the previous look in the row (or the row start): the chat
template's own tokens there are constants that the query learns to ignore.

Variants live in `READOUTS` (name -> factory(feature_dim, lm_dim, vocab_size, **options)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.registry import Registry

__all__ = [
    "COUNT_CODE",
    "LOOK_TOKEN",
    "READOUTS",
    "FocusReadout",
    "LOOK_PLACES",
    "build_readout",
    "check_look_at",
    "count_code",
    "counting_loss",
    "check_readout",
    "look_at",
    "grounding_loss",
    "look_inputs",
    "look_words",
    "register_readout",
]

#: Length of the counter's triangular code (counts 0 .. COUNT_CODE - 1 each get a direction; more saturate).
COUNT_CODE = 10

#: The placeholder a readout fills; the tokenizer holds it as one unsplittable special token.
LOOK_TOKEN = "<look>"

ReadoutFactory = Callable[..., nn.Module]
READOUTS: Registry[ReadoutFactory] = Registry("readout")


def register_readout(name: str) -> Callable[[ReadoutFactory], ReadoutFactory]:
    """Register a readout under `name`; its factory takes (feature_dim, lm_dim, vocab_size, **options)."""
    return READOUTS.register(name)


def build_readout(
    cfg: dict[str, Any],
    feature_dim: int,
    lm_dim: int,
    vocab_size: int = 1,
    count_words: tuple[int, ...] = (),
) -> nn.Module:
    """The readout `cfg["type"]` with the rest of `cfg` as its options (errors name the key); a factory
    takes (feature_dim, lm_dim, vocab_size, **options). `count_words`: per group, how many per-patch
    words the projector's heads give a counting readout (`AnchoredProjector.count_words`), passed only
    when set (a counter's selectors are sized by them)."""
    opts = dict(cfg)
    name = opts.pop("type", None)
    if not isinstance(name, str):
        raise ValueError(
            f"model.readout.type must name a readout ({', '.join(READOUTS.known())}), got {name!r}"
        )
    if count_words:
        opts["count_words"] = tuple(count_words)
    try:
        return READOUTS[name](feature_dim, lm_dim, vocab_size, **opts)
    except TypeError as e:  # an option the readout does not take
        raise ValueError(f"model.readout: {e}") from None


def check_readout(cfg: Any) -> None:
    """Refuse a bad `model.readout` when the recipe loads (ConfigError naming the key), not at step 1."""
    from encoders.common import ConfigError

    if not isinstance(cfg, dict):
        raise ConfigError(f"model.readout must be a mapping such as {{type: focus}}, got {cfg!r}")
    try:
        build_readout(cfg, 8, 8, 8, count_words=(2, 2))  # the projector's words are known only at build
    except (ValueError, KeyError) as e:
        raise ConfigError(str(e)) from None


#: Where a look goes (`model.readout.at`): after each question, or first in each reply (mllm.chat).
LOOK_PLACES: tuple[str, ...] = ("question", "answer")


def check_look_at(at: Any) -> str:
    """`at` if it names a LOOK_PLACES entry, else a ValueError naming `model.readout.at`."""
    if at not in LOOK_PLACES:
        raise ValueError(f"model.readout.at must be one of {', '.join(LOOK_PLACES)}, got {at!r}")
    return at


def look_at(readout: dict[str, Any] | None) -> str:
    """Where a model's looks go, from its readout config (`meta.readout`); "question" by default, the
    place every model saved before the option existed used."""
    return check_look_at((readout or {}).get("at", "question"))


def _check_number(key: str, value: Any, strict: bool) -> None:
    """`model.readout.<key>` must be a finite number > 0 (strict) or >= 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (strict and value == 0):
        raise ValueError(f"model.readout.{key} must be a number {'>' if strict else '>='} 0, got {value!r}")


@register_readout("focus")
class FocusReadout(nn.Module):
    """Multi-head attention pooling of one image's patch features with a query made from the question.

    Per head h: s_p = c <W_q LN(q), W_k LN(f_p)> / sqrt(d) (c: `scale`), a = softmax_p(s), v_h = sum_p a_p LN(f_p); the look
    embedding is MLP([v_1..v_H, max_p s, logsumexp_p s, sum_p sigmoid(s_p)]). The pooled *features*
    (not projected tokens) keep the tower's own code for colour, shape and position; the three match
    statistics say how well and how widely the question matched, which existence and counting need
    and a softmax average alone hides. Options add statistics: `count` (how many matching objects),
    `where` (the attended column and row), `where_words` (that side as the LM's words), `where_bias`
    (place in the attention scores); `value: tokens` pools the projected tokens instead (below).
    """

    def __init__(
        self,
        feature_dim: int,
        lm_dim: int,
        vocab_size: int = 1,
        heads: int = 4,
        dim: int = 64,
        ground: float = 0.0,
        value: str = "features",
        words: str = "lm",
        scale: float = 1.0,
        gate: bool = False,
        count: float = 0.0,
        at: str = "question",
        where: bool = False,
        count_words: tuple[int, ...] = (),
        where_words: tuple[str, ...] | list[str] = (),
        where_bias: bool = False,
        order: float = 0.0,
        roles: bool = False,
        relation_words: tuple[str, ...] | list[str] = (),
    ) -> None:
        super().__init__()
        check_look_at(at)  # read by mllm.chat through meta.readout (look_at), not by the module
        for key, size in (("heads", heads), ("dim", dim)):
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"model.readout.{key} must be a positive integer, got {size!r}")
        _check_number("ground", ground, strict=False)
        if value not in ("features", "tokens"):
            raise ValueError(f"model.readout.value must be 'features' or 'tokens', got {value!r}")
        if words not in ("lm", "own"):
            raise ValueError(f"model.readout.words must be 'lm' or 'own', got {words!r}")
        _check_number("scale", scale, strict=True)
        self.scale = float(scale)
        # words "own": the question's words come from the readout's own table, not the LM's embeddings.
        # Why: after lm_pretrain the LM's colour words share most of their direction (cosine ~0.65), so a
        # query built from them tells "red" from "blue" only after the matcher amplifies the difference;
        # measured (scripts/models_that_see/ground_only.py), a fresh table grounds 92% of questions after
        # 300 steps against 83% from the LM's rows.
        self.words = nn.Embedding(vocab_size, lm_dim) if words == "own" else None
        if not isinstance(gate, bool):
            raise ValueError(f"model.readout.gate must be true or false, got {gate!r}")
        # gate: the question also picks *which dimensions* of the pooled value pass (sigmoid(W q) * value),
        # so a colour question's look can carry the referent's colour and little else: what the LM then
        # has to learn is to copy the look, not to pick one attribute of several out of it.
        self.gate = nn.Linear(lm_dim, lm_dim) if gate else None
        self.heads, self.dim, self.value = heads, dim, value
        # weight of the grounding loss (training with `look_targets`): cross-entropy of the heads' mean
        # attention against the question's referent patches; 0 = the LM's answer alone teaches the look
        self.ground = float(ground)
        _check_number("count", count, strict=False)
        # count > 0: counting by detection, from the tower warm-up's per-patch heads (the anchored
        # projector's `count_maps`: an object density d_p that adds 1 per object over its patches, and
        # per group g (colour, shape) P_p(w) for its named words). The question picks, per group, one
        # word or "any": u_g = softmax over the group's words, each scored by the most telling word of
        # the question (max_t W_g LN(e_t)), and "any" (a learned constant), and a patch matches with
        # m_p = prod_g (sum_w u_gw P_p(w) + u_g,any), so "red shapes", "circles", "red circles" and
        # "shapes" are all one selection. n = sum_p d_p m_p is the number of named objects, given to the
        # look as n and as a triangular code relu(1 - |n - k|), k = 0..COUNT_CODE-1, so each integer is
        # its own direction and "2" is one linear read away. Trained (weight `count`) from the look's
        # targets: BCE of m against the referent patches on the patches that show an object, and a
        # Huber loss of n against the number of referents; the maps are read, not trained, here. Why
        # the heads and not a matcher of the readout's own: measured (docs/results.md, "Eighth round"),
        # the warm-up's heads count the held-out questions better than a matcher learned in instruct.
        self.count = float(count)
        groups = tuple(count_words)
        if count > 0 and (not groups or not all(isinstance(k, int) and k > 0 for k in groups)):
            raise ValueError(
                "model.readout.count needs per-patch word heads to count with: an anchored projector "
                "(projector: anchored_mlp2x_gelu) whose heads the tower warm-up trains"
            )
        self.count_select = nn.ModuleList(nn.Linear(lm_dim, k) for k in groups) if count > 0 else None
        # "any" is a learned constant per group, not a word's vote: a word max-pooled over the question
        # would let the commonest words ("how", "many") decide it
        self.count_any = nn.Parameter(torch.zeros(len(groups))) if count > 0 else None
        # whether the selector's rows start from the words' own-table embeddings (`anchor_count`)
        self.register_buffer("count_anchored", torch.zeros((), dtype=torch.bool) if count > 0 else None)
        if not isinstance(where, bool):
            raise ValueError(f"model.readout.where must be true or false, got {where!r}")
        # where: per head, the attention-weighted mean patch column and row (in [-1, 1]) as two more
        # statistics, so "is the star on the left or the right?" is read from the look like its colour
        # (the pooled tokens say *what* was found, not *where*)
        self.where = where
        # where_words (left, right, top, bottom): the attended side also as the LM's own words, the way
        # the anchored projector gives a patch its colour word. Why: with the side only as two numbers
        # among the statistics, the LM read left/right from them but not top/bottom (held-out "top or
        # bottom" 60-89% with the attention on the right object in every case measured, against 97% for
        # "left or right"; docs/results.md, "Ninth round"). Per axis, P(side) = sigmoid(+-k * the heads'
        # mean attended coordinate) mixes the two words' rows (tied to the LM's input embeddings, each
        # minus the axis mean, plus learned offsets from zero); the question gates how much of it the look
        # carries (sigmoid(w . LN(q) + b), from one half).
        self._word_axes("where", where_words, "left, right, top, bottom", lm_dim)
        if self.where_words and not where:
            raise ValueError("model.readout.where_words needs where: true (it words the attended side)")
        if not isinstance(where_bias, bool):
            raise ValueError(f"model.readout.where_bias must be true or false, got {where_bias!r}")
        # where_bias: the question also shapes the attention by place, s_p += sum_j c_hj(q) phi_j(p) with
        # phi = (x, y, x^2, y^2) of the patch and c = W LN(q) (from zero), so "the object on the left" is
        # a slope towards the left and "in the center" a bowl around it. Why: most of the demo's wrong
        # shape answers named the object by place, and the heads put 23-56% of their attention on it
        # (docs/results.md, "Ninth round"); the features' sin-cos code has to learn a region per word.
        self.where_bias = nn.Linear(lm_dim, heads * 4) if where_bias else None
        if self.where_bias is not None:
            nn.init.zeros_(self.where_bias.weight)
            nn.init.zeros_(self.where_bias.bias)
        _check_number("order", order, strict=False)
        # order > 0: each head's query weighs the question's words by where they stand in it,
        # softmax_t(g_h r_t) with r_t from -1 (first word) to 1 (last), g_h learned and starting spread
        # over [-order, order], so one head can read "is the red square" and another "the black square"
        # in "is the red square above the black square?". Why: a mean of the words is the same for both
        # orders, and the held-out "above" / "left of" questions stayed at 40-67% (docs/results.md,
        # "Ninth round"). 0: every head reads the plain mean.
        self.order = nn.Parameter(torch.linspace(-order, order, heads)) if order > 0 else None
        if not isinstance(roles, bool):
            raise ValueError(f"model.readout.roles must be true or false, got {roles!r}")
        if roles and (order <= 0 or heads % 2):
            raise ValueError("model.readout.roles needs order > 0 and an even number of heads")
        # roles: a question relating two objects ("is A above B?") grounds the first half of the heads
        # (which `order` starts reading the first words) on A and the second half on B, so their
        # attended places (`where`) say which is where; other questions ground both halves on all their
        # referents (`role_grounding_loss`)
        self.roles = roles
        # relation_words (left, right, above, below; needs roles): where the subject's heads looked
        # against where the object's did, as the LM's words: P(left) = sigmoid(k (x_object - x_subject)),
        # P(above) = sigmoid(k (y_object - y_subject)), mixing rows tied like `where_words`', gated by the
        # question. So "is A to the left of B?" finds "left" or "right" in its look, as "is there a red
        # circle?" finds red or not. Why: with the two places only as numbers, the LM had not learned to
        # compare them in the demo's budget (docs/results.md, "Ninth round").
        self._word_axes("relation", relation_words, "left, right, above, below", lm_dim)
        if self.relation_words and not roles:
            raise ValueError(
                "model.readout.relation_words needs roles: true (a subject's and an object's heads)"
            )
        n_stats = 3 + 2 * where
        n_count = COUNT_CODE + 1 if count > 0 else 0
        self.norm = nn.LayerNorm(feature_dim)
        # The question is a mean over a varying number of words: normalising it keeps the attention
        # logits' scale independent of the question's length (a 20-token mean is ~20x smaller than
        # the words that matter in it, which made the attention too flat to learn in a few hundred steps).
        self.qnorm = nn.LayerNorm(lm_dim)
        self.q = nn.Linear(lm_dim, heads * dim)
        self.k = nn.Linear(feature_dim, heads * dim)
        # value "features": MLP(pooled features, match statistics). value "tokens": the pooled *image
        # tokens* (what the projector made of each patch, the vectors the LM already reads; with an
        # anchored projector, the referent's attribute words), plus MLP(match statistics), which starts
        # at zero so a look starts as exactly that mixture.
        width = (heads * (feature_dim + n_stats) if value == "features" else heads * n_stats) + n_count
        self.out = nn.Sequential(nn.Linear(width, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))
        if value == "tokens":
            nn.init.zeros_(self.out[-1].weight)
            nn.init.zeros_(self.out[-1].bias)
        self.empty = nn.Parameter(torch.zeros(lm_dim))  # a look with no image before it

    @torch.no_grad()
    def anchor_count(self, names: tuple[tuple[str, ...], ...], tokenizer: Any, logit: float = 5.0) -> int:
        """Start the counter's selector lexical: row w of group g becomes `logit` x the mean of the
        normalised own-table embeddings of the word's distinct first tokens in its forms (alone, after a
        space, with an "s": the GeoWorld plural) / width, so a question word among j such tokens scores
        ~logit / j and any other word ~0. Why: the plurals ("circles") occur only in count questions,
        and a selector learned from random rows had, after the demo's instruct, still not learned
        several of them (docs/results.md, "Eighth round"). `names`: per group, its words in
        `count_maps` order. Returns the number of rows set; does nothing without an own word table, or
        once anchored (a reloaded or resumed model keeps them)."""
        if self.count_select is None or self.words is None or bool(self.count_anchored):
            return 0
        if len(names) != len(self.count_select):
            raise ValueError(f"anchor_count: {len(names)} word groups for {len(self.count_select)} selectors")
        n = 0
        for select, group in zip(self.count_select, names):
            if len(group) != select.out_features:
                raise ValueError(f"anchor_count: {len(group)} words for a selector of {select.out_features}")
            for k, word in enumerate(group):
                forms = (word, " " + word, word + "s", " " + word + "s")
                ids = sorted(
                    {i for f in forms for i in tokenizer(f, add_special_tokens=False)["input_ids"][:1]}
                )
                rows = self.qnorm(self.words.weight[ids].to(select.weight.dtype))
                select.weight[k] = logit * rows.mean(0) / rows.shape[-1]
                select.bias[k] = 0.0
                n += 1
        self.count_anchored.fill_(True)
        return n

    def _say(self, rows: torch.Tensor, name: str, toward: torch.Tensor, qn: torch.Tensor) -> torch.Tensor:
        """Two axes' words as a look term: per axis, sigmoid(+-k * toward) (the first word where `toward`
        [m, 2] is positive) mixes its two rows [4, d_lm]; the question (`qn`) gates the sum."""
        p = torch.sigmoid(getattr(self, f"{name}_sharpness") * torch.stack([toward, -toward], -1))
        gate = torch.sigmoid(getattr(self, f"{name}_gate")(qn))  # [m, 1]
        return gate * (p.flatten(1) @ rows.to(p.dtype))

    def _ordered_queries(self, text: torch.Tensor, look: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """[n_looks, H, d_lm]: per head, the question's words weighted by softmax_t(g_h r_t) (`order`); a
        look with no words keeps the mean query (`mean`, [n_looks, d_lm])."""
        n = mean.shape[0]
        if look.numel() == 0:
            return mean[:, None, :].expand(n, self.heads, mean.shape[-1])
        logit = _word_ranks(look, n).to(text.dtype)[:, None] * self.order.to(text.dtype)  # [P, H]
        w = torch.exp(logit - logit.detach().amax())
        num = text.new_zeros(n, self.heads, text.shape[-1]).index_add_(0, look, w[:, :, None] * text[:, None])
        den = text.new_zeros(n, self.heads).index_add_(0, look, w)
        q = num / den.clamp_min(1e-12)[..., None]
        return torch.where(den[..., None] > 0, q, mean[:, None, :].to(q.dtype))

    def _word_axes(self, name: str, words: tuple[str, ...] | list[str], meaning: str, lm_dim: int) -> None:
        """`{name}_words`, `{name}_ids` (buffer, -1 until tied), `{name}_offsets`, `{name}_sharpness`
        and `{name}_gate` (from zero) for two axes of two words each (`where_words`, `relation_words`);
        all None when `words` is empty."""
        words = tuple(words)
        if words and (len(words) != 4 or not all(isinstance(w, str) and w for w in words)):
            raise ValueError(
                f"model.readout.{name}_words must be four words ({meaning}), got {list(words)!r}"
            )
        setattr(self, f"{name}_words", words)
        self.register_buffer(f"{name}_ids", torch.full((4, 2), -1, dtype=torch.long) if words else None)
        setattr(self, f"{name}_offsets", nn.Parameter(torch.zeros(4, lm_dim)) if words else None)
        setattr(self, f"{name}_sharpness", nn.Parameter(torch.tensor(4.0)) if words else None)
        gate = nn.Linear(lm_dim, 1) if words else None
        if gate is not None:
            nn.init.zeros_(gate.weight)
            nn.init.zeros_(gate.bias)
        setattr(self, f"{name}_gate", gate)

    @torch.no_grad()
    def anchor_where(self, embedding: nn.Embedding, tokenizer: Any) -> int:
        """Tie each where (and relation) word to its first token alone (an answer) and after a space (in
        a question), as `AnchoredProjector.anchor` ties its words. Returns the number tied; nothing once
        anchored."""
        n = 0
        for words, ids in ((self.where_words, self.where_ids), (self.relation_words, self.relation_ids)):
            if ids is None or bool((ids >= 0).all()):
                continue
            for i, word in enumerate(words):
                for j, form in enumerate((word, " " + word)):
                    got = tokenizer(form, add_special_tokens=False)["input_ids"]
                    if not got or got[0] >= embedding.num_embeddings:
                        raise ValueError(f"readout word {form!r}: no token the LM embeds (ids {got})")
                    ids[i, j] = got[0]
            n += len(words)
        return n

    def where_table(self, embedding: nn.Embedding) -> torch.Tensor:
        """[4, lm_dim]: the where words' rows (the LM's embeddings of both forms, each minus its axis'
        mean, once anchored) plus the learned offsets."""
        return _word_rows(self.where_ids, self.where_offsets, embedding)

    def relation_table(self, embedding: nn.Embedding) -> torch.Tensor:
        """[4, lm_dim]: the relation words' rows, as `where_table`."""
        return _word_rows(self.relation_ids, self.relation_offsets, embedding)

    def forward(
        self,
        features: torch.Tensor,
        queries: torch.Tensor,
        image_index: torch.Tensor,
        targets: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
        count_maps: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None,
        words: tuple[torch.Tensor, torch.Tensor] | None = None,
        where_rows: torch.Tensor | None = None,
        relation_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """features [n_images, N, D]; queries [n_looks, d_lm]; image_index [n_looks] (-1: no image);
        targets [n_looks, N] (optional): each look's referent patches (an all-zero row: none);
        tokens [n_images, N, d_lm]: the projected image tokens (needed by value "tokens");
        count_maps (`count`): per image the object density [n_images, N] and, per group, the word
        probabilities [n_images, N, k] (`AnchoredProjector.count_maps`);
        words (`count`): the questions' word embeddings [P, d_lm] and the look each is in [P] (`look_words`);
        where_rows (`where_words`): `where_table` [4, d_lm]; relation_rows (`relation_words`):
        `relation_table` [4, d_lm].

        Returns the look embeddings [n_looks, d_lm] and, with targets, the grounding loss (else None)."""
        n = queries.shape[0]
        out = self.empty.to(queries.dtype).expand(n, -1).clone()
        has = image_index >= 0
        if not bool(has.any()):
            return out, None
        f = self.norm(features)[image_index[has]]  # [m, N, D]
        qn = self.qnorm(queries[has])  # the question, for the query and every gate
        if self.order is not None:
            if words is None:
                raise ValueError("a readout with `order` needs the questions' words")
            per_head = self._ordered_queries(words[0], words[1], queries)[has]  # [m, H, d_lm]
            q = self.q(self.qnorm(per_head)).view(-1, self.heads, self.heads, self.dim)
            q = torch.diagonal(q, dim1=1, dim2=2).transpose(1, 2).unsqueeze(2)  # head h's own query
        else:
            q = self.q(qn).view(-1, self.heads, 1, self.dim)  # [m, H, 1, d]
        k = self.k(f).view(f.shape[0], f.shape[1], self.heads, self.dim).transpose(1, 2)  # [m, H, N, d]
        s = self.scale * (q * k).sum(-1) / math.sqrt(self.dim)  # [m, H, N]
        if self.where_bias is not None:
            px, py = _patch_coordinates(f.shape[1], s.device, s.dtype)
            phi = torch.stack([px, py, px * px, py * py], -1)  # [N, 4]
            c = self.where_bias(qn).view(-1, self.heads, 4)
            s = s + torch.einsum("mhj,nj->mhn", c, phi)
        a = s.softmax(-1)
        parts = [s.amax(-1), torch.logsumexp(s, -1) - math.log(s.shape[-1]), torch.sigmoid(s).sum(-1)]
        if self.where or self.relation_gate is not None:
            xs, ys = _patch_coordinates(f.shape[1], a.device, a.dtype)
            place = torch.stack([(a * xs).sum(-1), (a * ys).sum(-1)], -1)  # each head's column, row [m, H, 2]
        if self.where:
            parts += [place[..., 0], place[..., 1]]
        stats = torch.stack(parts, -1)  # [m, H, 3 or 5]
        extra: list[torch.Tensor] = []
        if self.count_select is not None:
            if count_maps is None:
                raise ValueError("a counting readout (model.readout.count) needs the projector's count_maps")
            if words is None:
                raise ValueError("a counting readout (model.readout.count) needs the questions' words")
            density = count_maps[0][image_index[has]].to(f.dtype)  # [m, N]
            match = torch.ones_like(density)
            for select, any_, group in zip(self.count_select, self.count_any, count_maps[1]):
                vote = _word_max(select(self.qnorm(words[0])), words[1], n)[has]  # [m, k]
                u = torch.cat([vote, any_.expand(vote.shape[0], 1)], -1).softmax(-1)  # [m, k + 1]
                w = group[image_index[has]].to(f.dtype)  # [m, N, k]
                match = match * (torch.einsum("mnk,mk->mn", w, u[:, :-1]) + u[:, -1:])
            n_objects = (density * match).sum(-1)  # [m]
            extra = [n_objects[:, None], count_code(n_objects)]
        if self.value == "tokens":
            if tokens is None:
                raise ValueError("readout value 'tokens' needs the projected image tokens")
            pooled = torch.einsum("mhn,mnd->md", a, tokens[image_index[has]].to(a.dtype)) / self.heads
            if self.gate is not None:
                pooled = 2 * torch.sigmoid(self.gate(qn)) * pooled  # starts at 1
            look = pooled + self.out(torch.cat([stats.flatten(1), *extra], -1))
        else:
            pooled = torch.einsum("mhn,mnd->mhd", a, f)  # [m, H, D]
            look = self.out(torch.cat([torch.cat([pooled, stats], -1).flatten(1), *extra], -1))
        if self.where_gate is not None:
            if where_rows is None:
                raise ValueError("a readout with where_words needs their rows (where_table)")
            # left / top where the heads' mean place is negative
            look = look + self._say(where_rows, "where", -place.mean(1), qn)
        if self.relation_gate is not None:
            if relation_rows is None:
                raise ValueError("a readout with relation_words needs their rows (relation_table)")
            half = self.heads // 2
            ahead = place[:, half:].mean(1) - place[:, :half].mean(1)  # object minus subject, [m, 2]
            look = look + self._say(relation_rows, "relation", ahead, qn)
        out[has] = look.to(out.dtype)
        if targets is None:
            return out, None
        t = targets[has].to(a.dtype)
        aux = self.ground * (role_grounding_loss(a, t) if self.roles else grounding_loss(a, t))
        if self.count_select is not None:
            shown = count_maps[1][0][image_index[has]].to(match.dtype).sum(-1)  # P(an object) per patch
            aux = aux + self.count * counting_loss(match, shown, n_objects, t)
        return out, aux


def _word_rows(ids: torch.Tensor, offsets: torch.Tensor, embedding: nn.Embedding) -> torch.Tensor:
    """Two axes of two words each ([4, 2] ids of each word's two forms): the embeddings' sums, each minus
    its axis' mean once tied (ids >= 0), plus the learned `offsets` [4, d]."""
    rows = offsets
    if bool((ids >= 0).all()):
        w = embedding(ids).sum(1).to(rows.dtype).view(2, 2, -1)  # [axis, side, d]
        rows = rows + (w - w.mean(1, keepdim=True)).reshape(4, -1)
    return rows


def _word_ranks(look: torch.Tensor, n_looks: int) -> torch.Tensor:
    """[P] look index of each word (grouped, in sequence order) -> its place in its question, from -1
    (first word) to 1 (last); a one-word question's word is -1."""
    counts = torch.bincount(look, minlength=n_looks)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(look.numel(), device=look.device) - start[look]
    return 2 * rank / (counts[look] - 1).clamp_min(1) - 1


def _word_max(logits: torch.Tensor, look: torch.Tensor, n_looks: int) -> torch.Tensor:
    """Per look, the maximum over its question's words of each selection logit ([P, C] -> [n_looks, C];
    0 for a look with no words): a question selects "circle" when one of its words says so, however
    long it is."""
    out = logits.new_full((n_looks, logits.shape[-1]), float("-inf"))
    out = out.scatter_reduce(0, look[:, None].expand_as(logits), logits, "amax")
    return torch.where(torch.isinf(out), torch.zeros_like(out), out)


def count_code(n: torch.Tensor) -> torch.Tensor:
    """[m] counts -> [m, COUNT_CODE] triangular code relu(1 - |n - k|): an integer n is the k-th unit vector."""
    k = torch.arange(COUNT_CODE, device=n.device, dtype=n.dtype)
    return (1 - (n[:, None] - k).abs()).clamp_min(0)


def counting_loss(
    match: torch.Tensor, shown: torch.Tensor, n: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """The counter's supervision from the looks' target rows [m, N] (0 off, 1 referent patch, 2 a
    referent's centre; a row of zeros: nothing named is there): BCE of the per-patch match m (a
    probability) against the referent patches, weighted by P(an object) there (`shown`; a background
    patch has no density to count and says nothing about the selection), plus Huber of the counts n [m]
    against the number of referents (their centres)."""
    on = (targets > 0).float()
    m = match.float().clamp(1e-6, 1 - 1e-6)  # by hand: F.binary_cross_entropy refuses autocast
    bce = -(on * m.log() + (1 - on) * (1 - m).log())
    shown = shown.float()
    selection = (bce * shown).sum() / shown.sum().clamp_min(1e-6)
    centres = ((targets == 2) | (targets == 4)).sum(-1).float()  # 4: a relation's object's centre
    return (selection + F.huber_loss(n.float(), centres)).to(match.dtype)


def _patch_coordinates(n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and row of each of `n` row-major patches of a square grid, scaled to [-1, 1]."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"model.readout.where needs a square patch grid, got {n} patches")
    c = (torch.arange(side, device=device, dtype=dtype) + 0.5) / side * 2 - 1
    return c.repeat(side), c.repeat_interleave(side)


def grounding_loss(attention: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the looks with a target of -sum_p t_p log(mean_h a_hp), t the target rows normalised to
    sum 1: the heads together should put their mass on the referents (how to share it is theirs).
    attention [m, H, N] (softmax over N), targets [m, N] >= 0. Zero (with a graph) when no row has one."""
    on = (targets > 0).to(attention.dtype)  # 2 marks an object's centre patch: a referent patch all the same
    mass = on.sum(-1)
    keep = mass > 0
    if not bool(keep.any()):
        return attention.sum() * 0.0
    t = on[keep] / mass[keep, None]
    a = attention[keep].mean(1).clamp_min(1e-9)
    return -(t * a.log()).sum(-1).mean()


def role_grounding_loss(attention: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`grounding_loss` per half of the heads: on a row with a relation's object (targets 3 and 4), the
    first half on the subject (1, 2) and the second on the object; on any other row both halves on all
    its referents. The mean of the two halves' losses."""
    half = attention.shape[1] // 2
    second = targets >= 3
    has_second = second.any(-1, keepdim=True)
    first_t = torch.where(has_second, (targets > 0) & ~second, targets > 0).to(targets.dtype)
    second_t = torch.where(has_second, second, targets > 0).to(targets.dtype)
    return 0.5 * (
        grounding_loss(attention[:, :half], first_t) + grounding_loss(attention[:, half:], second_t)
    )


def look_words(
    input_ids: torch.Tensor,
    look_id: int,
    image_id: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, T] long: for each text position, the (row-major) index of the look whose question it is in
    (the text after the previous look of the row, as in `look_inputs`); -1 for image, look and padding
    positions and for text after a row's last look."""
    is_look = input_ids == look_id
    text = (input_ids != image_id) & ~is_look
    if attention_mask is not None:
        text &= attention_mask.bool()
    before = torch.cumsum(is_look.long(), dim=1) - is_look.long()  # looks strictly before each position
    per_row = is_look.long().sum(1, keepdim=True)
    offset = torch.cumsum(per_row, 0) - per_row
    return torch.where(text & (before < per_row), offset + before, torch.full_like(before, -1))


def look_inputs(
    input_ids: torch.Tensor,
    embeds: torch.Tensor,
    look_id: int,
    image_id: int,
    tokens_per_image: int,
    attention_mask: torch.Tensor | None = None,
    look: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every look position (row-major): its question query, its image's index, and the position mask.
    `look`: `look_words` of the same arguments, when the caller has it already.

    The query is the mean input embedding of the text positions after the previous look of the row (or
    the row start) up to the look itself, image and padding positions excluded. The image is the most
    recent one whose placeholders all precede the look (images are numbered in row-major order, the
    order `embed` scatters them in); -1 where the row has none before the look.
    """
    is_look = input_ids == look_id
    is_image = input_ids == image_id
    rows, cols = is_look.nonzero(as_tuple=True)
    # the question of each look: the mean of its words (the same segmentation as `look_words`)
    if look is None:
        look = look_words(input_ids, look_id, image_id, attention_mask)
    mine = look >= 0
    n_looks = rows.numel()
    sums = embeds.new_zeros(n_looks, embeds.shape[-1]).index_add_(0, look[mine], embeds[mine])
    counts = torch.bincount(look[mine], minlength=n_looks).to(embeds.dtype)
    queries = sums / counts.clamp_min(1.0)[:, None]
    # image index: complete images before the look in its row, offset by the images of earlier rows
    img_before = torch.cumsum(is_image.long(), dim=1)[rows, cols] // tokens_per_image
    per_row = is_image.long().sum(1) // tokens_per_image
    offset = torch.cumsum(per_row, 0) - per_row
    index = torch.where(img_before > 0, offset[rows] + img_before - 1, torch.full_like(img_before, -1))
    return queries, index, is_look
