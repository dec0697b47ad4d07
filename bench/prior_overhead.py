"""PRIOR's training-time overhead with cached weights, against plain next-token prediction.

Both arms run the `prior` stage's real data path on the same model and the same batches: the
ConversationDataset + Collator (plain NTP) or the PriorDataset (the same samples plus their cached
token weights) + Collator, then forward (weighted or plain loss), backward and AdamW on the
projector. The arms alternate over several repeats in one process; the machine is noisy, so only
the ratio measured in the same run means anything. The weights are computed once, before timing,
as the stage does (that one-off pass is reported separately).

Usage: python bench/prior_overhead.py [--n 256] [--batch 32] [--repeats 7]
Last line: RESULT {"ntp_step_s", "prior_step_s", "overhead", "weights_pass_s", ...}; overhead is
prior/ntp - 1 (target: <= 0.05).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    from mllm import prior as P
    from mllm.config import load_recipe
    from mllm.data.batch import model_inputs
    from mllm.data.conversations import Collator, ConversationDataset
    from mllm.data.geoworld import write_world
    from mllm.training.runner import build_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256, help="GeoWorld training scenes (captions)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="prior-bench-"))
    world = tmp / "world"
    write_world(
        world,
        seed=0,
        n=args.n,
        size=64,
        n_eval=8,
        mmvp_pairs=2,
        pope_questions=6,
        refcoco_n=2,
        mathverse_problems=2,
    )
    recipe = load_recipe("prior-tiny", [f"extra.world={world}"])
    model = build_model(recipe.model, tmp / "run", [world / "align.json"], seed=0)
    ds = ConversationDataset(
        world / "align.json",
        world,
        model.tokenizer,
        "plain",
        model.image_token_id,
        model.num_image_tokens,
        model.tower.preprocess,
        model.meta.max_length,
    )
    settings = P.PriorSettings(alpha=1.0)
    ref = P.reference_from(model.lm, settings, len(model.tokenizer))
    t = time.perf_counter()
    cache = P.load_or_compute(ref, ds, settings, tmp / "cache", log=lambda *_: None)
    weights_pass_s = time.perf_counter() - t
    prior_ds = P.PriorDataset(ds, cache)
    collate = Collator(model.tokenizer.pad_token_id)

    models = {"ntp": model, "prior": copy.deepcopy(model)}
    data = {"ntp": ds, "prior": prior_ds}
    opts = {}
    for name, m in models.items():
        m.train()
        for k, p in m.named_parameters():
            p.requires_grad_(k.startswith("projector."))
        opts[name] = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    n_batches = len(ds) // args.batch
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.repeats + 1):
        b = r % n_batches
        idx = range(b * args.batch, (b + 1) * args.batch)
        for name, m in models.items():
            t = time.perf_counter()
            batch = collate([data[name][i] for i in idx])
            inputs = model_inputs(batch)
            out = m(**inputs)
            out.loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if r:  # the first round warms up allocators and kernels
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "ntp_step_s": round(med["ntp"], 4),
        "prior_step_s": round(med["prior"], 4),
        "overhead": round(med["prior"] / med["ntp"] - 1, 4),
        "weights_pass_s": round(weights_pass_s, 2),
        "samples": len(ds),
        "batch": args.batch,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
    }
    print(
        f"median step (data + forward + backward + AdamW), batch {args.batch}: NTP {med['ntp']:.4f}s, "
        f"PRIOR {med['prior']:.4f}s; one-off weight pass over {len(ds)} captions {weights_pass_s:.1f}s"
    )
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
