#!/usr/bin/env bash
# MMVP-VLM for a contrastive model (a ContrastiveModel folder or its run folder), in the official layout
# (Questions.csv + "MLLM_VLM Images/<Type>/<id>.jpg"); extra flags pass through (e.g. --batch-size 128,
# --device cuda). The same command with `retrieval` and a GeoWorld folder gives zero-shot R@1/R@5.
#   eval/mmvp_vlm.sh MODEL_DIR DATA_DIR OUT.json [flags ...]
set -euo pipefail
model=${1:?usage: $0 MODEL_DIR DATA_DIR OUT.json [flags]}; data=${2:?data dir}; out=${3:?out json}; shift 3
exec mllm eval mmvp_vlm --model "$model" --data "$data" --out "$out" "$@"
