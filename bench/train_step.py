"""One training step (forward, backward, AdamW) of MultimodalLM vs transformers' LLaVA, same model.

    python bench/train_step.py            # ~107M parameters, batch 8 from a LLaVA-like length mix
    python bench/train_step.py --quick    # CI-sized
    python bench/train_step.py --dtype bf16 --grad-ckpt --compile

Both models are built from the same configs (CLIP vision tower, Llama LM, mlp2x_gelu projector,
144 image tokens) with the same weights (key renaming; equal logits asserted first). The tower is
frozen and projector + LM train (LLaVA's instruct stage) in both. Contenders, alternating per round:
  reference       LlavaForConditionalGeneration on the right-padded batch
  ours            MultimodalLM on the same padded batch              -> step_time_ratio = ref / ours
  ours_packed     MultimodalLM, the same samples packed into rows of the padded width
                  -> useful_tokens_ratio_packed = (useful tokens / s, packed) / (same, reference)
  ours_packed_ckpt / ours_packed_compiled   with --grad-ckpt / --compile
MFU = the step's model FLOPs (what the loss needs: useful tokens only; the LM head at labelled
positions; the tower forward only) / step time / the peak of a large matmul in the run's dtype,
timed in the same process. The last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from _common import alternate, bf16_supported, machine, matmul_peak, median, result
from _pair import (
    LENGTH_MIX,
    QUICK_MIX,
    PairConfig,
    build_ours,
    build_reference,
    check_same_model,
    draw_samples,
)

from mllm.chat import IGNORE_INDEX
from mllm.data.batch import model_inputs
from mllm.data.conversations import Collator

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def model_flops(cfg: PairConfig, samples: list[dict]) -> float:
    """FLOPs one training step needs for these samples (fwd + bwd = 3x fwd where weights train)."""
    v, t = cfg.vision, cfg.text
    d_v, d = v["hidden_size"], t["hidden_size"]
    s_v = cfg.num_image_tokens + 1  # patches + CLS
    layers_v = v["num_hidden_layers"] + 1 + cfg.select_layer if cfg.select_layer < 0 else cfg.select_layer
    per_layer_v = 4 * d_v * d_v + 2 * d_v * v["intermediate_size"]
    n_img = len(samples)
    tower = n_img * layers_v * (2 * per_layer_v * s_v + 4 * s_v * s_v * d_v)  # frozen: forward only
    proj = 6 * (d_v * d + d * d) * n_img * cfg.num_image_tokens
    kv = d * t["num_key_value_heads"] // t["num_attention_heads"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * t["intermediate_size"]
    lm = 0.0
    labelled = 0
    for s in samples:
        n = len(s["input_ids"])
        lm += t["num_hidden_layers"] * (
            6 * per_layer * n + 6 * n * n * d
        )  # causal attention: half of 4 n^2 d, x3
        labelled += int((s["labels"][1:] != IGNORE_INDEX).sum())
    head = 6 * d * t["vocab_size"] * labelled
    return float(tower + proj + lm + head)


def make_step(
    model: torch.nn.Module, batch: dict, opt: torch.optim.Optimizer, fwd_kwargs: dict | None = None
):
    inputs = model_inputs(batch)

    def step() -> float:
        loss = model(**inputs, **(fwd_kwargs or {})).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def trainable(model: torch.nn.Module, tower_prefix: str) -> list[torch.nn.Parameter]:
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith(tower_prefix))
        if p.requires_grad:
            params.append(p)
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny config, 2 rounds (CI)")
    ap.add_argument("--config", default="default", help="default (~107M) | large (~1.2B, for a GPU) | quick")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--attn", default="sdpa", help="sdpa | eager | flash_attention_2")
    ap.add_argument("--batch", type=int, default=None, help="samples per step (default 8; --quick 4)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--grad-ckpt", action="store_true", help="also time ours packed with gradient checkpointing"
    )
    ap.add_argument(
        "--compile", action="store_true", help="also time ours packed with compiled decoder layers"
    )
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = PairConfig.named("quick" if args.quick else args.config)
    rounds = 2 if args.quick else args.rounds
    args.batch = args.batch or (4 if args.quick else 8)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    peaks = {"fp32": matmul_peak(torch.float32, dev)}
    if bf16_supported(dev):
        peaks["bf16"] = matmul_peak(torch.bfloat16, dev)
    log(f"matmul peaks GFLOP/s: { {k: round(v / 1e9, 1) for k, v in peaks.items()} }")

    ours = build_ours(cfg, args.attn, args.seed)
    ref = build_reference(cfg, ours, args.attn)
    n_params = sum(p.numel() for p in ours.parameters())
    samples = draw_samples(cfg, args.batch, args.seed, QUICK_MIX if args.quick else LENGTH_MIX)
    pad = 0
    padded = Collator(pad)([dict(s, id=str(i)) for i, s in enumerate(samples)])
    width = padded["input_ids"].shape[1]
    packed = Collator(pad, pack_length=width)([dict(s, id=str(i)) for i, s in enumerate(samples)])
    useful = int(padded["attention_mask"].sum())
    diff = check_same_model(ours, ref, padded, atol=1e-4)
    log(
        f"{n_params / 1e6:.1f}M parameters; same logits (max diff {diff:.2e}); batch {args.batch}: padded "
        f"{tuple(padded['input_ids'].shape)}, packed {tuple(packed['input_ids'].shape)}, useful tokens {useful}"
    )

    ours.to(dev, dtype).train()
    ref.to(dev, dtype).train()

    def on_dev(b: dict) -> dict:
        return {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}

    padded_d, packed_d = on_dev(padded), on_dev(packed)
    ref_inputs = {k: padded_d[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
    for k in ("pixel_values",):
        padded_d[k] = padded_d[k].to(dtype)
        packed_d[k] = packed_d[k].to(dtype)
        ref_inputs[k] = ref_inputs[k].to(dtype)
    opt_ours = torch.optim.AdamW(trainable(ours, "tower."), lr=1e-5)
    opt_ref = torch.optim.AdamW(trainable(ref, "model.vision_tower."), lr=1e-5)
    fns = {
        "reference": make_step(ref, ref_inputs, opt_ref),
        "ours": make_step(ours, padded_d, opt_ours),
        "ours_packed": make_step(ours, packed_d, opt_ours),
    }
    if args.grad_ckpt:
        ckpt = copy.deepcopy(ours)
        ckpt.gradient_checkpointing_enable()
        fns["ours_packed_ckpt"] = make_step(
            ckpt, packed_d, torch.optim.AdamW(trainable(ckpt, "tower."), lr=1e-5)
        )
    if args.compile:
        comp = copy.deepcopy(ours)
        for layer in comp.lm.get_decoder().layers:
            layer.compile(dynamic=True)
        fns["ours_packed_compiled"] = make_step(
            comp, packed_d, torch.optim.AdamW(trainable(comp, "tower."), lr=1e-5)
        )
    times = alternate(fns, rounds, warmup=1, device=dev, log=log)
    # The ceiling is the best the hardware showed: on a shared machine a neighbour may have slowed
    # the first measurement, so it is taken again after the steps and the higher one kept.
    peaks["fp32"] = max(peaks["fp32"], matmul_peak(torch.float32, dev))
    if "bf16" in peaks:
        peaks["bf16"] = max(peaks["bf16"], matmul_peak(torch.bfloat16, dev))
    med = {k: median(v) for k, v in times.items()}
    flops = model_flops(cfg, samples)
    peak = peaks.get(args.dtype, float("nan"))
    out = {
        "step_time_ratio": round(med["reference"] / med["ours"], 3),
        "useful_tokens_ratio_packed": round(med["reference"] / med["ours_packed"], 3),
        "mfu": round(flops / med["ours_packed"] / peak, 3),
        "mfu_ours_padded": round(flops / med["ours"] / peak, 3),
        "mfu_reference": round(flops / med["reference"] / peak, 3),
        "step_s": {k: round(v, 4) for k, v in med.items()},
        "useful_tokens_per_s": {k: round(useful / v, 1) for k, v in med.items()},
        "useful_fraction_padded": round(useful / padded["input_ids"].numel(), 3),
        "useful_fraction_packed": round(useful / packed["input_ids"].numel(), 3),
        "rows": {"padded": list(padded["input_ids"].shape), "packed": list(packed["input_ids"].shape)},
        "model_tflops_per_step": round(flops / 1e12, 4),
        "peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()},
        "params_m": round(n_params / 1e6, 1),
        "dtype": args.dtype,
        "attn": args.attn,
        "device": str(dev),
        "batch": args.batch,
        "rounds": rounds,
        "config": "quick" if args.quick else args.config,
        "machine": machine(),
    }
    if "ours_packed_ckpt" in med:
        out["grad_ckpt_slowdown"] = round(med["ours_packed_ckpt"] / med["ours_packed"], 3)
    if "ours_packed_compiled" in med:
        out["compile_speedup"] = round(med["ours_packed"] / med["ours_packed_compiled"], 3)
    result(out)


if __name__ == "__main__":
    main()
