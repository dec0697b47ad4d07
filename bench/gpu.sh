#!/usr/bin/env bash
# The benchmark suite on a CUDA device, in bf16, with flash-attention 2 when it is installed (else SDPA).
#
#   bash bench/gpu.sh                 # results in bench-gpu/ (one log per benchmark) + a summary
#   OUT=dir ATTN=sdpa bash bench/gpu.sh
#
# MFU is measured against the device's own peak: train_step.py times a large bf16 matmul on the same
# device in the same process. Without a CUDA device it refuses (exit 2) instead of measuring a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "bench/gpu.sh: no CUDA device (torch.cuda.is_available() is False, torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo '?'))." >&2
  echo "This suite measures a GPU; on a CPU run bench/train_step.py, bench/generate.py and bench/data.py directly." >&2
  exit 2
fi
if [ -z "${ATTN:-}" ]; then
  ATTN=$("$PY" -c 'import importlib.util as u; print("flash_attention_2" if u.find_spec("flash_attn") else "sdpa")')
fi
OUT=${OUT:-bench-gpu}
mkdir -p "$OUT"
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")' | tee "$OUT/device.txt"
echo "attention: $ATTN" | tee -a "$OUT/device.txt"

run() {
  local name=$1; shift
  echo "== $name: $*"
  "$PY" "$@" 2>&1 | tee "$OUT/$name.log"
}

run train_step bench/train_step.py --device cuda --dtype bf16 --attn "$ATTN" --rounds 10 --grad-ckpt
run train_step_large bench/train_step.py --device cuda --dtype bf16 --attn "$ATTN" --rounds 10 --config large \
  --batch 16 --grad-ckpt
run generate bench/generate.py --device cuda --dtype bf16 --attn "$ATTN" --rounds 10
run data bench/data.py
if "$PY" bench/contrastive_loss.py --help 2>/dev/null | grep -q -- "--device"; then
  run contrastive_loss bench/contrastive_loss.py --device cuda
else
  run contrastive_loss bench/contrastive_loss.py
fi

echo "== summary ($OUT)"
for f in "$OUT"/*.log; do
  echo "$(basename "$f" .log): $(grep '^RESULT ' "$f" | tail -1)"
done
