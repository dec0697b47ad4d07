#!/usr/bin/env bash
# Stage 0 (contrastive encoder pretraining: image tower + text tower + heads) under the deepspeed
# launcher, on any number of GPUs or CPU processes. It runs every stage of an encoder recipe: model kind
# `contrastive` (`model.encoder.objective`: clip | siglip | filip | dcl | negclip | unif_align), `cloc`,
# `tips` or `ssl` (DINO-style, images only).
#   train/stage0_encoder.sh RECIPE OUT [key=value ...]      (NPROC=N to choose the process count)
# The trained tower is OUT/<stage>/final/image_tower, an ordinary HF folder a MultimodalLM recipe
# names as its `model.tower.path`.
set -euo pipefail
recipe=${1:?usage: $0 RECIPE OUT [key=value ...]}; out=${2:?usage: $0 RECIPE OUT [key=value ...]}; shift 2
here=$(cd "$(dirname "$0")" && pwd)
exec bash "$here/launch.sh" train --recipe "$recipe" --out "$out" "$@"
