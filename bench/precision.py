"""fp32 vs bf16 training-step time of a tiny MultimodalLM on this machine (why the demo uses fp32).

Alternates the two precisions over several repeats in one process and prints the medians and the
ratio; the machine is noisy, so only the ratio measured in the same run means anything.
Usage: python bench/precision.py [--width 192] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from encoders.towers import TowerConfig
from mllm.model import MultimodalLM, build_lm
from mllm.tokenizer import train_tokenizer


def make(width: int, vocab: int, tok) -> MultimodalLM:
    torch.manual_seed(0)
    lm = build_lm(
        None,
        dict(
            model_type="llama",
            hidden_size=width,
            intermediate_size=int(width * 8 / 3) // 8 * 8,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        ),
        vocab,
    )
    tower = TowerConfig(
        type="clip",
        select_layer=-1,
        config=dict(
            image_size=64,
            patch_size=8,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=3,
            num_attention_heads=4,
        ),
    )
    return MultimodalLM.build(tower, "mlp2x_gelu", lm, tok)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--text", type=int, default=110)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    tok = train_tokenizer([f"word{i} shape colour {i % 7}" for i in range(4000)], vocab_size=2048)
    models = {
        "fp32": make(args.width, len(tok), tok),
        "bf16": make(args.width, len(tok), tok).to(torch.bfloat16),
    }
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    n_img = models["fp32"].num_image_tokens
    ids = torch.randint(10, len(tok), (args.batch, n_img + args.text))
    ids[:, :n_img] = models["fp32"].image_token_id
    labels = ids.clone()
    labels[:, : n_img + args.text // 2] = -100
    pix = torch.randn(args.batch, 3, 64, 64)
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(args.repeats + 1):
        for k, m in models.items():
            t = time.perf_counter()
            out = m(input_ids=ids, pixel_values=pix, labels=labels)
            out.loss.backward()
            opts[k].step()
            opts[k].zero_grad()
            if i:  # the first round warms up allocators and kernels
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in models["fp32"].parameters())
    print(
        f"width {args.width}, {params / 1e6:.2f}M parameters, batch {args.batch} x {n_img + args.text} tokens"
    )
    print(
        "RESULT "
        + json.dumps(
            {
                "fp32_step_s": round(med["fp32"], 4),
                "bf16_step_s": round(med["bf16"], 4),
                "bf16_speedup": round(med["fp32"] / med["bf16"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
