"""Shared tiny fixtures: a tokenizer trained on a few sentences and a tiny CLIP + Llama MultimodalLM."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

from encoders.towers import TowerConfig  # noqa: E402

CORPUS = [
    "What color is the circle?",
    "red",
    "blue",
    "green",
    "How many shapes are there?",
    "2",
    "3",
    "A large red circle at the top left and a small blue triangle pointing up.",
    "Describe the image briefly.",
    "What shape is the blue object?",
    "triangle",
    "square",
    "Is the triangle pointing up or down?",
] * 5

TINY_TOWER = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
)
TINY_LM = dict(
    model_type="llama",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


@pytest.fixture(scope="session")
def tokenizer():
    from mllm.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture()
def tiny_model(tokenizer):
    from mllm.model import MultimodalLM, build_lm

    torch.manual_seed(0)
    lm = build_lm(None, TINY_LM, len(tokenizer))
    return MultimodalLM.build(
        TowerConfig(type="clip", config=TINY_TOWER, select_layer=-1),
        "mlp2x_gelu",
        lm,
        tokenizer,
        template="chatml",
        max_length=128,
    )
