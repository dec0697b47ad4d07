"""Greedy generation with KV cache: MultimodalLM.generate vs LlavaForConditionalGeneration.generate.

    python bench/generate.py            # ~107M-parameter pair (bench/_pair.py), 1 image + 40 text tokens, 64 new
    python bench/generate.py --quick

Same model (weights copied, equal logits asserted), same prompt, greedy, no stop token (so both
produce exactly --new tokens, and the token ids must agree). Per round, alternating: a 1-token
generate (time to first token: prefill incl. the image) and an N-token generate. Decode tokens/s =
(N - 1) / (t_N - t_1). Key `tokens_per_s_ratio` = ours / reference (decode); also end-to-end.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _common import alternate, machine, median, result
from _pair import PairConfig, build_ours, build_reference, check_same_model, draw_samples

from mllm.data.conversations import Collator

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--new", type=int, default=None, help="new tokens (default 64; --quick 16)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = PairConfig.quick() if args.quick else PairConfig()
    n_new = args.new or (16 if args.quick else 64)
    rounds = 3 if args.quick else args.rounds
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    ours = build_ours(cfg, args.attn, args.seed).eval()
    ref = build_reference(cfg, ours, args.attn).eval()
    (sample,) = draw_samples(cfg, 1, args.seed, mix=((1.0, 40, 40),))
    batch = Collator(0)([dict(sample, id="0")])
    check_same_model(ours, ref, batch, atol=1e-4)
    for m in (ours.lm, ref):  # no stop token: both must produce exactly n_new tokens
        m.generation_config.eos_token_id = None
    ours.to(dev, dtype)
    ref.to(dev, dtype)
    ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    pix = batch["pixel_values"].to(dev, dtype)
    prompt_len = ids.shape[1]

    def run_ours(n: int) -> torch.Tensor:
        return ours.generate(ids, pix, mask, max_new_tokens=n)

    def run_ref(n: int) -> torch.Tensor:
        out = ref.generate(
            input_ids=ids,
            pixel_values=pix,
            attention_mask=mask,
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
        return out[:, prompt_len:]

    with torch.no_grad():
        a, b = run_ours(n_new), run_ref(n_new)
    if args.dtype == "fp32":
        assert a.tolist() == b.tolist(), f"different greedy tokens:\n ours {a.tolist()}\n ref  {b.tolist()}"
    assert a.shape[1] == b.shape[1] == n_new
    log(f"prompt {prompt_len} tokens ({cfg.num_image_tokens} image), {n_new} new tokens; same tokens")

    with torch.no_grad():
        times = alternate(
            {
                "ours_ttft": lambda: run_ours(1),
                "ref_ttft": lambda: run_ref(1),
                "ours_n": lambda: run_ours(n_new),
                "ref_n": lambda: run_ref(n_new),
            },
            rounds,
            warmup=1,
            device=dev,
            log=log,
        )
    med = {k: median(v) for k, v in times.items()}
    dec_ours = (n_new - 1) / max(med["ours_n"] - med["ours_ttft"], 1e-9)
    dec_ref = (n_new - 1) / max(med["ref_n"] - med["ref_ttft"], 1e-9)
    result(
        {
            "tokens_per_s_ratio": round(dec_ours / dec_ref, 3),
            "e2e_tokens_per_s_ratio": round(med["ref_n"] / med["ours_n"], 3),
            "ttft_ratio": round(med["ref_ttft"] / med["ours_ttft"], 3),
            "decode_tokens_per_s": {"ours": round(dec_ours, 1), "reference": round(dec_ref, 1)},
            "ttft_s": {"ours": round(med["ours_ttft"], 4), "reference": round(med["ref_ttft"], 4)},
            "total_s": {"ours": round(med["ours_n"], 4), "reference": round(med["ref_n"], 4)},
            "prompt_tokens": prompt_len,
            "new_tokens": n_new,
            "dtype": args.dtype,
            "attn": args.attn,
            "device": str(dev),
            "rounds": rounds,
            "config": "quick" if args.quick else "default",
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
