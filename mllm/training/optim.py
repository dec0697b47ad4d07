"""Optimiser parameter groups (one per trainable module, each with its own learning rate) and the
cosine-with-warm-up schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def set_trainable(model: nn.Module, trainable: dict[str, float]) -> dict[str, list[str]]:
    """Freeze everything, then unfreeze parameters under each prefix; unknown prefixes are an error."""
    names = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    matched: dict[str, list[str]] = {}
    for prefix in trainable:
        hits = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not hits:
            tops = sorted({n.split(".")[0] for n in names})
            raise ValueError(f"trainable module {prefix!r} matches no parameter; top-level modules: {tops}")
        for n in hits:
            names[n].requires_grad_(True)
        matched[prefix] = hits
    return matched


def param_groups(model: nn.Module, trainable: dict[str, float], weight_decay: float) -> list[dict]:
    """One group per (prefix, decay/no-decay); biases and norms (1-D tensors) get no weight decay.

    The longest matching prefix wins, so `lm: 2e-5` with `lm.model.embed_tokens: 0` works.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    prefixes = sorted(trainable, key=len, reverse=True)
    groups: dict[tuple[str, bool], dict] = {}
    for n, p in named:
        prefix = next((q for q in prefixes if n == q or n.startswith(q + ".")), None)
        if prefix is None:
            continue
        decay = p.ndim >= 2 and weight_decay > 0
        key = (prefix, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": trainable[prefix],
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"{prefix}{'' if decay else '/no_decay'}",
            }
        groups[key]["params"].append(p)
    return list(groups.values())


def cosine_with_warmup(warmup: int, total: int, min_ratio: float = 0.0):
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay to `min_ratio`."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(1.0, max(0.0, progress))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_optimizer(groups: list[dict], betas: tuple[float, float]) -> torch.optim.Optimizer:
    clean = [{k: v for k, v in g.items() if k != "name"} for g in groups]
    return torch.optim.AdamW(clean, betas=betas, foreach=True)
