"""Projectors: map vision tokens [B, N, in_dim] into the LLM's embedding space [B, N, out_dim].

The modules are plain `nn.Linear` / `nn.Sequential` in LLaVA's exact layout, so parameter names match
LLaVA checkpoints (`0.weight`, `2.weight` for mlp2x_gelu) and an export to transformers'
`LlavaForConditionalGeneration` stays a key rename.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

__all__ = [
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
