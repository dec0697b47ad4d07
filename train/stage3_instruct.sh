#!/usr/bin/env bash
# Stage 3 (instruct: projector + LLM) under the deepspeed launcher; starts from OUT/align/final.
#   train/stage3_instruct.sh RECIPE OUT [key=value ...]   (NPROC=N to choose the process count)
set -euo pipefail
recipe=${1:?usage: $0 RECIPE OUT [key=value ...]}; out=${2:?usage: $0 RECIPE OUT [key=value ...]}; shift 2
here=$(cd "$(dirname "$0")" && pwd)
exec bash "$here/launch.sh" train --recipe "$recipe" --out "$out" --stage instruct "$@"
