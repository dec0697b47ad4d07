"""AGLA decoding: exact reduction to greedy, the augmented view, and the β cut-off."""

from __future__ import annotations

import torch
from PIL import Image

from mllm.chat import encode_conversation
from mllm.data.conversations import left_pad
from mllm.evaluation.agla import AglaConfig, augmented_view, calibrated_generate, patch_relevance
from mllm.inference import answer_batch, stop_ids


def _prompts(m, tok, qs):
    seqs = [
        encode_conversation(
            [("user", f"<image>\n{q}")],
            tok,
            "chatml",
            m.image_token_id,
            m.num_image_tokens,
            1,
            for_generation=True,
        )["input_ids"]
        for q in qs
    ]
    return left_pad(seqs, tok.pad_token_id)


def test_alpha_zero_beta_zero_is_greedy(tiny_model, tokenizer):
    m = tiny_model.eval()
    ids, mask = _prompts(m, tokenizer, ["What color?", "How many shapes are there in the picture?"])
    pix = torch.randn(2, 3, 32, 32)
    stops = stop_ids(m)
    greedy = m.generate(ids, pix, mask, max_new_tokens=6, stop_token_ids=stops)
    ours = calibrated_generate(
        m, ids, pix, mask, torch.zeros_like(pix), AglaConfig(alpha=0.0, beta=0.0), 6, stops
    )
    assert ours.tolist() == greedy.tolist()


def test_beta_cutoff_keeps_only_plausible_tokens(tiny_model, tokenizer):
    m = tiny_model.eval()
    ids, mask = _prompts(m, tokenizer, ["What color?"])
    pix = torch.randn(1, 3, 32, 32)
    aug = torch.randn(1, 3, 32, 32)
    out = calibrated_generate(m, ids, pix, mask, aug, AglaConfig(alpha=5.0, beta=0.999999), 1, [])
    logits = m(input_ids=ids, attention_mask=mask, pixel_values=pix).logits[0, -1]
    # With β → 1 only the original view's top token survives the cut-off, whatever α says.
    assert out[0, 0].item() == logits.argmax().item()


def test_augmented_view_keeps_top_patches(tiny_model, tokenizer):
    m = tiny_model.eval()
    pix = torch.ones(1, 3, 32, 32)
    rel = torch.arange(16, dtype=torch.float32)[None]  # grid 4x4, highest relevance last
    aug = augmented_view(m, pix, rel, keep_ratio=0.25)
    kept = aug[0, 0].view(4, 8, 4, 8).amax(dim=(1, 3))  # per-patch max
    assert kept.flatten().tolist() == [0.0] * 12 + [1.0] * 4
    ids, mask = _prompts(m, tokenizer, ["What color?"])
    r = patch_relevance(m, torch.randn(1, 3, 32, 32), ids, mask)
    assert r.shape == (1, 16) and torch.isfinite(r).all()


def test_answer_batch_agla_runs_and_needs_images(tiny_model):
    m = tiny_model.eval()
    ims = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    out = answer_batch(m, ["What color?", "Is there a circle?"], ims, max_new_tokens=4, decoding="agla")
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    import pytest

    with pytest.raises(ValueError, match="needs an image"):
        answer_batch(m, ["What color?"], [None], decoding="agla")
