"""Tiny on-disk LLaVA datasets for engine tests (real PNG files, real JSON)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square")


def write_tiny_world(root: Path, n: int = 48, seed: int = 0, size: int = 32) -> dict[str, Path]:
    """n images of one coloured shape; align captions and single-turn colour/shape QA."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    align, instruct = [], []
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        im = Image.new("RGB", (size, size), "white")
        d = ImageDraw.Draw(im)
        box = (6, 6, size - 6, size - 6)
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
        rel = f"images/{i:04d}.png"
        im.save(root / rel)
        align.append(
            {
                "id": f"a{i}",
                "image": rel,
                "conversations": [
                    {"from": "human", "value": "Describe the image briefly.\n<image>"},
                    {"from": "gpt", "value": f"a {colour} {shape}"},
                ],
            }
        )
        q = rng.choice(["What color is the shape?", "What shape is it?"])
        a = colour if "color" in q else shape
        instruct.append(
            {
                "id": f"q{i}",
                "image": rel,
                "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
            }
        )
    (root / "align.json").write_text(json.dumps(align))
    (root / "instruct.json").write_text(json.dumps(instruct))
    return {"align": root / "align.json", "instruct": root / "instruct.json", "images": root}


def tiny_recipe(
    world: dict[str, Path],
    backend: str = "deepspeed",
    zero: str | None = "train/ds/zero2.json",
    steps: tuple[int, int] = (6, 6),
    checkpoint_every: int = 0,
) -> dict:
    return {
        "name": "test",
        "model": {
            "tower": {
                "type": "clip",
                "select_layer": -1,
                "config": dict(
                    image_size=32,
                    patch_size=8,
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                ),
            },
            "projector": "mlp2x_gelu",
            "lm": {
                "config": dict(
                    model_type="llama",
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    num_key_value_heads=2,
                    max_position_embeddings=128,
                )
            },
            "tokenizer": {"vocab_size": 300},
            "max_length": 96,
        },
        "stages": [
            {
                "name": "align",
                "kind": "align",
                "data": {"json": str(world["align"]), "images": str(world["images"])},
                "lr": 3e-3,
                "batch_size": 8,
                "max_steps": steps[0],
                "warmup_ratio": 0.0,
            },
            {
                "name": "instruct",
                "kind": "instruct",
                "data": {"json": str(world["instruct"]), "images": str(world["images"])},
                "lr": 3e-3,
                "batch_size": 8,
                "max_steps": steps[1],
                "warmup_ratio": 0.0,
                "grad_accum": 2,
            },
        ],
        "engine": {
            "backend": backend,
            "zero_config": zero,
            "precision": "fp32",
            "seed": 0,
            "checkpoint_every": checkpoint_every,
            "keep_last": 2,
            "progress": False,
        },
    }


def subprocess_env(repo: Path, **extra: str) -> dict[str, str]:
    """Environment for running `python -m mllm.cli` in a child: offline, this checkout importable, and
    without this pytest process's own process-group variables (a child would reuse its port)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(repo))
    for k in ("MLLM_FAULT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env
