#!/usr/bin/env bash
# One ablation row of "Models that see" (docs/results.md): the demo recipe with OVERRIDES, every stage
# from lm_pretrain, on the world, tower and live stream of `mllm demo --seed S --out runs/demo_fS`, then
# the full held-out QA, POPE and MMVP-style sets. One thread, so two rows can run side by side.
#   [RECIPE=other.yaml] [DEMO=runs/other_demo] bash scripts/models_that_see/exp_run.sh NAME SEED [key=value ...]
set -euo pipefail
name=$1 seed=$2
shift 2
demo=${DEMO:-runs/demo_f$seed}
out=runs/exp8/$name
mkdir -p runs/exp8
OMP_NUM_THREADS=1 mllm train --recipe "${RECIPE:-mllm/recipes/tiny-geoworld.yaml}" --out "$out" \
  extra.world=$demo/world extra.tower=$demo/encoder/contrastive/final/image_tower \
  extra.live_seed=$((seed + 1)) engine.seed=$seed engine.threads=1 "$@" >"runs/exp8/$name.log" 2>&1
for b in qa pope mmvp; do
  d=$b
  [ "$b" = qa ] && d=eval
  OMP_NUM_THREADS=1 mllm eval $b --model "$out/instruct/final" --data $demo/world/$d \
    --out "runs/exp8/$name-$b.json" >>"runs/exp8/$name.log" 2>&1
done
python - "$name" <<'PY'
import json, sys
n = sys.argv[1]
q = json.load(open(f"runs/exp8/{n}-qa.json"))
p = json.load(open(f"runs/exp8/{n}-pope.json"))
m = json.load(open(f"runs/exp8/{n}-mmvp.json"))
print(n, "QA", round(q["accuracy"], 1), {k: round(v, 1) for k, v in q["per_category"].items()})
pope = {k: (round(v["accuracy"], 1), round(v["yes_ratio"])) for k, v in p.items() if isinstance(v, dict) and "accuracy" in v}
print(n, "POPE", pope, "MMVP pairs", round(m["pair_accuracy"], 1), "questions", round(m["question_accuracy"], 1))
PY
