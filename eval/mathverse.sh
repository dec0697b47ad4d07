#!/usr/bin/env bash
# mathverse for an mllm checkpoint of any size: greedy by default; extra flags pass through
# (e.g. --decoding agla, --batch-size 32, --dtype bf16; --device cuda is taken when a GPU exists).
#   eval/mathverse.sh MODEL_DIR DATA_DIR OUT.json [flags ...]
set -euo pipefail
model=${1:?usage: $0 MODEL_DIR DATA_DIR OUT.json [flags]}; data=${2:?data dir}; out=${3:?out json}; shift 3
exec mllm eval mathverse --model "$model" --data "$data" --out "$out" "$@"
