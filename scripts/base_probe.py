"""Does a candidate base variant have the fault a claim needs? Build it for one seed beside the demo's run
(`mllm.evidence.runner.ensure_variant`: the demo's stages it would train alike are linked, the rest
trained) and score it greedily on the world's POPE, QA and MMVP-style pairs.

This is how `weak-yes` (the base of `agla-weak` and `prior-weak`) was chosen, and how the candidates
that fell short were measured (docs/evidence.md, "A base that hallucinates"). It looks at the base only;
no claim's comparison is run, so choosing a base with it tunes nothing a verdict reads. Usage:

    python scripts/base_probe.py --bases runs/evidence/base --seed 0 --name weak-yes-140 \
        stages.instruct.max_steps=140 stages.instruct.data.live.curriculum=2100 \
        stages.instruct.eval_every=140 stages.instruct.data.live.existence_yes=0.9 \
        stages.instruct.data.live.existence_near=0.0 stages.instruct.data.live.existence=4

The variant is kept under BASES/s<seed>/variants/<name>/ (a re-run only scores it); the last line is
`RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mllm.evaluation.runner import evaluate
from mllm.evidence.claims import AGLA, BaseVariant
from mllm.evidence.runner import MLLM_DATA, ensure_base, ensure_variant
from mllm.model import MultimodalLM


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bases", required=True, help="the evidence bases folder (BASES/s<seed> = the demo)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", required=True, help="the variant's folder name")
    ap.add_argument("--quick", action="store_true", help="the demo's quick sizes (tests, smoke runs)")
    ap.add_argument("overrides", nargs="+", help="key=value overrides of the demo's recipe")
    args = ap.parse_args(argv)
    base = Path(args.bases) / f"s{args.seed}"
    ensure_base(AGLA, base, args.seed, args.quick, print)  # the demo of this seed, built if missing
    variant = BaseVariant(args.name, "a candidate base", tuple(args.overrides))
    cost = ensure_variant(variant, base, args.seed, args.quick, print)
    model = MultimodalLM.from_pretrained(cost["final"])
    out: dict[str, object] = {"name": args.name, "seed": args.seed, "overrides": args.overrides}
    for bench in ("pope", "qa", "mmvp"):
        metrics, _ = evaluate(model, bench, base / "world" / MLLM_DATA[bench], batch_size=32)
        if bench == "pope":
            out["pope"] = {
                split: {"accuracy": round(m["accuracy"], 1), "yes_ratio": round(m["yes_ratio"], 1)}
                for split, m in metrics.items()
                if isinstance(m, dict) and "accuracy" in m
            }
        else:
            out[bench] = round(metrics["accuracy" if bench == "qa" else "pair_accuracy"], 1)
    out["train_cpu_s"] = cost["cpu_s"]
    out["shared_with_demo"] = cost["shared_with_base"]
    print("RESULT " + json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
