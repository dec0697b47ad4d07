"""Shared tiny fixtures: a tokenizer trained on a few sentences and a tiny CLIP + Llama MultimodalLM."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

from encoders.towers import TowerConfig  # noqa: E402


# ------------------------------------------------------------------------------------------ two tiers
# The default run (the README's command) is the quick tier. Tests marked `slow` (randomised kill-and-resume
# trials, kills through the CLI and launch.sh, a hung peer's timeout, the wheel in a fresh environment,
# 200k-sample memory growth) are the long tier: `python -m pytest -m slow` runs them alone, `--slow` runs
# both. CI runs both tiers (.ci/run). Why: on a 2-core machine without avx512 the whole suite took over
# 15 minutes, most of it in real processes importing torch to be killed; the quick tier keeps one real
# SIGKILL at every kill point (tests/test_faults.py), so a resume regression still fails it.
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (the long tier)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow") or "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="long tier: python -m pytest -m slow (or --slow); CI runs it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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
