"""`model.lm.init`: how a from-config LM starts (mllm.lm_init)."""

from __future__ import annotations

import pytest
import torch

from mllm.lm_init import LM_INITS, apply_lm_init, register_lm_init
from mllm.model import build_lm

TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
}


def test_mimetic_attention_matches_content_and_copies():
    torch.manual_seed(0)
    lm = build_lm(None, TINY, 100, init="mimetic")
    x = torch.randn(8, 64)
    for layer in lm.model.layers:
        a = layer.self_attn
        assert torch.equal(a.q_proj.weight, a.k_proj.weight)
        assert torch.equal(a.o_proj.weight, a.v_proj.weight.T)
        # W_q^T W_k ~ I: a vector's query-key score with itself beats its score with other vectors
        qk = a.q_proj(x) @ a.k_proj(x).T
        assert (qk.diagonal() > qk.masked_fill(torch.eye(8, dtype=torch.bool), -1e9).max(1).values).all()
        # W_o W_v ~ I: the copied value points the way its input did
        out = a.o_proj(a.v_proj(x))
        assert torch.nn.functional.cosine_similarity(out, x).min() > 0.5


def test_default_keeps_the_class_init():
    torch.manual_seed(0)
    lm = build_lm(None, TINY, 100)
    a = lm.model.layers[0].self_attn
    assert not torch.equal(a.q_proj.weight, a.k_proj.weight)


def test_bad_init_names_and_places():
    with pytest.raises(ValueError, match="unknown model.lm.init 'bogus'.*mimetic"):
        build_lm(None, TINY, 100, init="bogus")
    with pytest.raises(ValueError, match="applies to an LM built from model.lm.config"):
        build_lm("some/dir", {}, 100, init="mimetic")
    with pytest.raises(ValueError, match="as many key/value heads"):
        build_lm(None, dict(TINY, num_key_value_heads=2), 100, init="mimetic")
    with pytest.raises(ValueError, match="already registered"):
        register_lm_init("mimetic")(lambda lm: None)
    assert {"default", "mimetic"} <= set(LM_INITS)
    assert apply_lm_init(build_lm(None, TINY, 100), "default") is not None
