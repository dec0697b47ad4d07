"""How a from-scratch LM's weights start (`model.lm.init`): one registry entry per scheme.

Why this exists: the demo's LM is tiny and trained from scratch, and what it must learn first is to
*bind*: find the patches of "the circle" among 64 image tokens and read their colour. That is a
two-step attention circuit, and from the default initialisation it forms late and suddenly (the
binding probe, docs/results.md, "Third round"). Mimetic initialisation (Trockman & Kolter, "Mimetic
Initialization of Self-Attention Layers", ICML 2023) starts each attention layer close to what trained
layers look like: W_q W_k^T ~ I, so a token attends to tokens whose content resembles its own, and
W_o W_v ~ I, so what it attends to is copied. With image tokens that are the LM's own word embeddings
(`mllm.projectors.AnchoredProjector`), "circle" in the question then matches the circle's patches
from the first step. The paper's ViT recipe uses W_o W_v ~ -I; here the sign is + (copy), the form a
binding circuit needs (measured with `vo` as a knob in scripts/models_that_see/binding_probe.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from encoders.registry import Registry

LMInit = Callable[[PreTrainedModel], None]
LM_INITS: Registry[LMInit] = Registry("model.lm.init")


def register_lm_init(name: str) -> Callable[[LMInit], LMInit]:
    return LM_INITS.register(name)  # a decorator: the place recorded is where it is applied


def apply_lm_init(lm: PreTrainedModel, name: str) -> PreTrainedModel:
    """Re-initialise `lm` in place by the scheme `name` (see LM_INITS); returns it."""
    LM_INITS[name](lm)
    return lm


@register_lm_init("default")
def _default(lm: PreTrainedModel) -> None:
    """The model class's own initialisation (what `from_config` already did)."""


def _attention_blocks(lm: PreTrainedModel) -> list[nn.Module]:
    blocks = [m for m in lm.modules() if all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))]
    if not blocks:
        raise ValueError(
            f"{type(lm).__name__}: no attention block with q_proj/k_proj/v_proj/o_proj; "
            "mimetic init knows the Llama-style layout only"
        )
    return blocks


@register_lm_init("mimetic")
@torch.no_grad()
def _mimetic(lm: PreTrainedModel) -> None:
    """W_k = W_q and W_o = W_v^T, each a Gaussian with variance 1/d_in, so W_q^T W_k ~ W_v^T W_o^T ~ I."""
    for block in _attention_blocks(lm):
        q, k, v, o = block.q_proj.weight, block.k_proj.weight, block.v_proj.weight, block.o_proj.weight
        if q.shape != k.shape or o.shape != v.T.shape:
            raise ValueError(
                f"mimetic init needs as many key/value heads as query heads; got q {tuple(q.shape)}, "
                f"k {tuple(k.shape)}, v {tuple(v.shape)}, o {tuple(o.shape)}"
            )
        w = torch.randn_like(q) / q.shape[1] ** 0.5
        q.copy_(w)
        k.copy_(w)
        u = torch.randn_like(v) / v.shape[1] ** 0.5
        v.copy_(u)
        o.copy_(u.T)
