"""Projectors: map vision tokens [B, N, in_dim] into the LLM's embedding space [B, N, out_dim].

The modules are plain `nn.Linear` / `nn.Sequential` in LLaVA's exact layout, so parameter names match
LLaVA checkpoints (`0.weight`, `2.weight` for mlp2x_gelu) and an export to transformers'
`LlavaForConditionalGeneration` stays a key rename.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from encoders.registry import Registry
from encoders.supervised import PatchTargets
from mllm.data.geoworld.vocab import COLOR_NAMES, SHAPES

__all__ = [
    "AnchoredProjector",
    "PROJECTORS",
    "build_projector",
    "known_projectors",
    "register_projector",
    "register_projector_pattern",
]

ProjectorFactory = Callable[[int, int], nn.Module]
PatternFactory = Callable[[re.Match[str], int, int], nn.Module]

# name -> factory(in_dim, out_dim); a family of names (mlp{N}x_gelu) is one pattern entry, whose
# factory(match, in_dim, out_dim) gets the name's regex match, so build_projector needs no if-chain.
PROJECTORS: Registry[ProjectorFactory] = Registry("projector")


def register_projector(name: str) -> Callable[[ProjectorFactory], ProjectorFactory]:
    """Register a projector under a fixed `name`."""
    return PROJECTORS.register(name)


def register_projector_pattern(pattern: str, display: str) -> Callable[[PatternFactory], PatternFactory]:
    """Register a family of projectors whose names fully match the regex `pattern` (shown as `display`)."""

    def decorator(factory: PatternFactory) -> PatternFactory:
        PROJECTORS.register_pattern(pattern, display, lambda match: partial(factory, match), stacklevel=2)
        return factory

    return decorator


def known_projectors() -> list[str]:
    """Every name or family `build_projector` accepts, for error messages and CLI help."""
    return PROJECTORS.known()


def build_projector(name: str, in_dim: int, out_dim: int) -> nn.Module:
    """Build the projector `name` mapping `in_dim`-wide vision tokens to `out_dim`-wide LLM embeddings."""
    if in_dim <= 0 or out_dim <= 0:
        raise ValueError(f"projector dims must be positive, got in_dim={in_dim}, out_dim={out_dim}")
    return PROJECTORS[name](in_dim, out_dim)


@register_projector("identity")
def _identity(in_dim: int, out_dim: int) -> nn.Module:
    """No parameters: for towers already trained into the LLM's space (or width-matched debugging)."""
    if in_dim != out_dim:
        raise ValueError(
            f"the identity projector needs in_dim == out_dim, got {in_dim} -> {out_dim}; "
            "use 'linear' or 'mlp2x_gelu'"
        )
    return nn.Identity()


@register_projector("linear")
def _linear(in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA-1's projector."""
    return nn.Linear(in_dim, out_dim)


@register_projector_pattern(r"mlp(\d+)x_gelu", display="mlp{N}x_gelu")
def _mlp_gelu(match: re.Match[str], in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA-1.5's family: Linear(in, out), then (N-1) x [GELU, Linear(out, out)]; LLaVA-1.5 uses N=2."""
    return _mlp(int(match.group(1)), match.group(0), in_dim, out_dim)


def _mlp(depth: int, name: str, in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear(in, out), then (depth-1) x [GELU, Linear(out, out)]: the body of every mlp{N}x_gelu variant."""
    if depth < 1:
        raise ValueError(f"mlp{{N}}x_gelu needs N >= 1, got {name!r}")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


class _Standardised(nn.Module):
    """Per-channel standardisation of the vision tokens (BatchNorm over batch and tokens), then `inner`."""

    def __init__(self, dim: int, inner: nn.Module):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)
        self.inner = inner

    def forward(self, x):  # [B, N, D]
        return self.inner(self.norm(x.flatten(0, 1)).view_as(x))


@register_projector_pattern(r"bn_mlp(\d+)x_gelu", display="bn_mlp{N}x_gelu")
def _bn_mlp_gelu(match: re.Match[str], in_dim: int, out_dim: int) -> nn.Module:
    """mlp{N}x_gelu over per-channel standardised tokens (see `_Standardised`)."""
    return _Standardised(in_dim, _mlp(int(match.group(1)), match.group(0), in_dim, out_dim))


#: The head groups a counting readout selects words from (one word, or "any", per group).
COUNT_GROUPS: tuple[str, ...] = ("colour", "shape")


class AnchoredProjector(nn.Module):
    """Per-patch attribute heads whose class probabilities mix the LM's own embeddings of the class words,
    added to an mlp{N}x_gelu path for everything the heads do not name (position, figure detail).

    Why: a small LM learns slowly to read a categorical direction that an MLP writes somewhere in its
    input, and slower still to bind it ("what colour is *the circle*") across 64 image tokens; measured,
    a frozen tower whose patches a linear probe reads at 98% still left a fresh projector + LM at chance
    on colour (docs/results.md, "Models that see"). When a patch token *is* (softly) the embedding of
    "red" plus that of "circle", matching the question's word to the patch and copying the answer word
    out through the tied unembedding are the circuits an LM learns first. The visual tokens become
    probability-weighted mixtures of embedding rows, as Ovis's probabilistic visual tokens are, with the
    rows tied to words instead of a separate visual vocabulary. (Measured so far: the LM side of a binding
    probe learns this way in 500 steps, but the demo pipeline's held-out QA has not moved yet, with true
    labels in place of the tower's either; docs/results.md, "Second round".)

    Background patches must be *silent* (zero vectors): the background rows are held at zero and the MLP
    path is gated by the first head's probability that an object covers the patch. Measured on a 3-layer
    Llama reading 64 word-mixture tokens (question first): with zero background tokens binding reached
    100% in 500 steps; with the same background as one constant non-zero token it stayed at ~50%
    (docs/results.md). A zero token after the LM's RMSNorm has a zero key and a zero value, so the
    answer's attention only ever competes among the object's patches.

    The rows are *tied* to the LM's input embeddings (the word as an answer, "red", plus the word inside
    a question, " red"), looked up at every forward, so a patch of a red circle is the very vectors the
    LM reads and writes for those words; `anchors` are learned offsets on top, starting at zero. Measured:
    with anchors *copied* once from the embeddings, the copy and the LM's rows drifted apart (cosine 0.3
    after training) and colour stayed at chance.

    `heads` (one Linear, groups in `words` order) is what the tower warm-up trains as its per-patch heads
    (`readout_heads`). `anchor` records the words' token ids once the LM knows its words (`anchored` says
    so, and a resumed or reloaded model keeps them); before that the word rows are zero.
    """

    reads_lm_embeddings = True  # MultimodalLM.project_features passes the LM's input embeddings

    def __init__(self, in_dim: int, out_dim: int, depth: int, words: dict[str, tuple[str | None, ...]]):
        super().__init__()
        self.words = {k: tuple(v) for k, v in words.items()}
        self.sizes = [len(v) for v in self.words.values()]
        rows = sum(self.sizes)
        self.heads = nn.Linear(in_dim, rows)
        self.anchors = nn.Parameter(torch.zeros(rows, out_dim))
        self.body = _mlp(depth, f"anchored_mlp{depth}x_gelu", in_dim, out_dim)
        # The body starts silent, so a token starts as its words: measured on the demo, a default-initialised
        # MLP's output was ~20x the LM's word-embedding scale and drowned the anchors (docs/results.md).
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)
        self.register_buffer("anchored", torch.zeros((), dtype=torch.bool))
        # Per row, the token ids of the word alone and after a space (-1: none; background rows have none).
        self.register_buffer("word_ids", torch.full((rows, 2), -1, dtype=torch.long))
        # Background rows (word None) stay zero: see the class docstring.
        named = torch.tensor(
            [w is not None for group in self.words.values() for w in group], dtype=torch.float32
        )
        self.register_buffer("named", named[:, None], persistent=False)

    def table(self, embedding: nn.Embedding | None) -> torch.Tensor:
        """The row vectors: tied word embeddings (once anchored) plus the learned offsets; background zero."""
        rows = self.anchors
        if bool(self.anchored):
            if embedding is None:
                raise ValueError("an anchored projector reads the LM's input embeddings; pass `embedding`")
            # Background rows hold id -1; what they look up is removed by `named` below and by `keep`.
            words = embedding(self.word_ids.clamp(min=0)).sum(1).to(rows.dtype)
            # Each word minus its group's mean: what tells "red" from the other colours. A text-trained LM's
            # colour words share most of their direction (mean cosine 0.65 after the demo's lm_pretrain).
            parts = []
            for w, keep in zip(words.split(self.sizes), self.named.split(self.sizes)):
                many = float(keep.sum() > 1)  # a one-word group ("object") has nothing to be told apart from
                parts.append(w - many * (w * keep).sum(0, keepdim=True) / keep.sum().clamp(min=1))
            rows = rows + torch.cat(parts)
        return rows * self.named

    def forward(self, x: torch.Tensor, embedding: nn.Embedding | None = None) -> torch.Tensor:
        groups = [g.softmax(-1) for g in self.heads(x).split(self.sizes, dim=-1)]
        if "density" in self.words:
            # The LM reads the density ("object") but does not retrain it: it is what a counting readout
            # sums, and measured, training it through the answers took the warm-up's heads from counting
            # 73 of 75 held-out questions to 8 (docs/results.md, "Eighth round").
            i = list(self.words).index("density")
            groups[i] = groups[i].detach()
        probs = torch.cat(groups, dim=-1)
        first = groups[0]
        seen = 1.0 - first[..., :1]  # P(an object covers this patch), from the first head
        # Exactly zero where the first head says background: a near-zero token is not silent, since the
        # LM's RMSNorm scales it back up (measured: 0.002-norm background tokens took 50-90% of attention).
        silent = (first.argmax(-1, keepdim=True) != 0).to(x.dtype)
        return silent * (seen * self.body(x) + probs @ self.table(embedding))

    @property
    def count_names(self) -> tuple[tuple[str, ...], ...]:
        """The words `count_maps` gives per patch, per group (the named colours, the named shapes); ()
        without a density head. A counting readout is sized by them and starts its selector from them."""
        if "density" not in self.words:
            return ()
        return tuple(
            tuple(w for w in self.words[g] if w is not None) for g in COUNT_GROUPS if g in self.words
        )

    @property
    def count_words(self) -> tuple[int, ...]:
        """How many words `count_maps` gives per patch in each group (`count_names`' sizes)."""
        return tuple(len(g) for g in self.count_names)

    def count_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None:
        """What a counting readout (mllm.readout, `count`) sums, from the warm-up's heads: per patch the
        object density ([..., N]; the "density" head's P, trained by the tower warm-up so that each object
        adds 1 over its patches) and, per group of `count_words`, P(word) for its named words ([..., N, k]).
        None without a density head."""
        if not self.count_words:
            return None
        groups = dict(zip(self.words, (g.softmax(-1) for g in self.heads(x).split(self.sizes, dim=-1))))
        return groups["density"][..., 1], tuple(groups[g][..., 1:] for g in COUNT_GROUPS if g in groups)

    @torch.no_grad()
    def anchor(self, embedding: nn.Embedding, tokenizer) -> int:
        """Tie each named class to its word's first token, alone (an answer) and after a space (inside a
        question). Returns the number of words tied; does nothing once anchored."""
        if bool(self.anchored):
            return 0
        n = 0
        for i, word in enumerate(w for group in self.words.values() for w in group):
            if word is None:
                continue
            for j, form in enumerate((word, " " + word)):
                ids = tokenizer(form, add_special_tokens=False)["input_ids"]
                if not ids:
                    raise ValueError(f"the tokenizer gives no tokens for the anchor word {form!r}")
                if ids[0] >= embedding.num_embeddings:
                    raise ValueError(
                        f"anchor word {form!r}: token id {ids[0]} is outside the LM's embeddings"
                    )
                self.word_ids[i, j] = ids[0]
            n += 1
        self.anchored.fill_(True)
        return n


@register_projector_pattern(r"anchored_mlp(\d+)x_gelu", display="anchored_mlp{N}x_gelu")
def _anchored(match: re.Match[str], in_dim: int, out_dim: int) -> nn.Module:
    """AnchoredProjector over GeoWorld's per-patch label words (the tower warm-up's targets)."""
    return AnchoredProjector(
        in_dim, out_dim, int(match.group(1)), PatchTargets(COLOR_NAMES, SHAPES, density=True).words()
    )
