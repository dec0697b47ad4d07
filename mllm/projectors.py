"""Projectors: map vision tokens [B, N, in_dim] into the LLM's embedding space [B, N, out_dim].

The modules are plain `nn.Linear` / `nn.Sequential` in LLaVA's exact layout, so parameter names match
LLaVA checkpoints (`0.weight`, `2.weight` for mlp2x_gelu) and an export to transformers'
`LlavaForConditionalGeneration` stays a key rename.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from encoders.supervised import PatchTargets
from mllm.data.geoworld.vocab import COLOR_NAMES, SHAPES

__all__ = [
    "AnchoredProjector",
    "PROJECTORS",
    "PROJECTOR_PATTERNS",
    "build_projector",
    "known_projectors",
    "register_projector",
    "register_projector_pattern",
]

ProjectorFactory = Callable[[int, int], nn.Module]
PatternFactory = Callable[[re.Match[str], int, int], nn.Module]

# Fixed names -> factory(in_dim, out_dim).
PROJECTORS: dict[str, ProjectorFactory] = {}
# Families of names (e.g. mlp{N}x_gelu) -> (compiled regex, factory(match, in_dim, out_dim)), keyed by a
# human-readable form used in error messages. A family is one entry, so build_projector needs no if-chain.
PROJECTOR_PATTERNS: dict[str, tuple[re.Pattern[str], PatternFactory]] = {}


def register_projector(name: str) -> Callable[[ProjectorFactory], ProjectorFactory]:
    """Register a projector under a fixed `name`."""

    def decorator(factory: ProjectorFactory) -> ProjectorFactory:
        if name in PROJECTORS:
            raise ValueError(f"projector {name!r} is already registered")
        PROJECTORS[name] = factory
        return factory

    return decorator


def register_projector_pattern(pattern: str, display: str) -> Callable[[PatternFactory], PatternFactory]:
    """Register a family of projectors whose names fully match the regex `pattern` (shown as `display`)."""

    def decorator(factory: PatternFactory) -> PatternFactory:
        if display in PROJECTOR_PATTERNS:
            raise ValueError(f"projector family {display!r} is already registered")
        PROJECTOR_PATTERNS[display] = (re.compile(pattern), factory)
        return factory

    return decorator


def known_projectors() -> list[str]:
    """Every name or family `build_projector` accepts, for error messages and CLI help."""
    return sorted(PROJECTORS) + sorted(PROJECTOR_PATTERNS)


def build_projector(name: str, in_dim: int, out_dim: int) -> nn.Module:
    """Build the projector `name` mapping `in_dim`-wide vision tokens to `out_dim`-wide LLM embeddings."""
    if in_dim <= 0 or out_dim <= 0:
        raise ValueError(f"projector dims must be positive, got in_dim={in_dim}, out_dim={out_dim}")
    if name in PROJECTORS:
        return PROJECTORS[name](in_dim, out_dim)
    for regex, factory in PROJECTOR_PATTERNS.values():
        match = regex.fullmatch(name)
        if match:
            return factory(match, in_dim, out_dim)
    raise ValueError(f"unknown projector {name!r}; known: {', '.join(known_projectors())}")


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
    rows tied to words instead of a separate visual vocabulary.

    `heads` (one Linear, groups in `words` order) is what the tower warm-up trains as its per-patch heads
    (`readout_heads`); `anchors` start as zeros and are set from the LM's embeddings by `anchor` once the
    LM knows its words (`anchored` records that, so a resumed or reloaded model is not re-anchored).
    """

    def __init__(self, in_dim: int, out_dim: int, depth: int, words: dict[str, tuple[str | None, ...]]):
        super().__init__()
        self.words = {k: tuple(v) for k, v in words.items()}
        self.sizes = [len(v) for v in self.words.values()]
        self.heads = nn.Linear(in_dim, sum(self.sizes))
        self.anchors = nn.Parameter(torch.zeros(sum(self.sizes), out_dim))
        self.body = _mlp(depth, f"anchored_mlp{depth}x_gelu", in_dim, out_dim)
        # The body starts silent, so a token starts as its words: measured on the demo, a default-initialised
        # MLP's output was ~20x the LM's word-embedding scale and drowned the anchors (docs/results.md).
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)
        self.register_buffer("anchored", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.heads(x).split(self.sizes, dim=-1)
        probs = torch.cat([g.softmax(-1) for g in logits], dim=-1)
        return self.body(x) + probs @ self.anchors

    @torch.no_grad()
    def anchor(self, embedding: nn.Embedding, tokenizer) -> int:
        """Set each named class's anchor to the mean embedding of its word's tokens, as the word appears
        alone (an answer) and after a space (inside a question); background classes stay zero. Returns
        the number of words anchored; does nothing once anchored."""
        if bool(self.anchored):
            return 0
        rows = [w for group in self.words.values() for w in group]
        n = 0
        for i, word in enumerate(rows):
            if word is None:
                continue
            ids = list(tokenizer(word, add_special_tokens=False)["input_ids"])
            ids += list(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
            if not ids:
                raise ValueError(f"the tokenizer gives no tokens for the anchor word {word!r}")
            weight = embedding.weight[torch.tensor(ids, device=embedding.weight.device)]
            self.anchors[i] = weight.float().mean(0).to(self.anchors.dtype)
            n += 1
        self.anchored.fill_(True)
        return n


@register_projector_pattern(r"anchored_mlp(\d+)x_gelu", display="anchored_mlp{N}x_gelu")
def _anchored(match: re.Match[str], in_dim: int, out_dim: int) -> nn.Module:
    """AnchoredProjector over GeoWorld's per-patch label words (the tower warm-up's targets)."""
    return AnchoredProjector(in_dim, out_dim, int(match.group(1)), PatchTargets(COLOR_NAMES, SHAPES).words())
