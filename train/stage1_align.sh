#!/usr/bin/env bash
# Stage 1 (align: projector only) under the deepspeed launcher, on any number of GPUs or CPU processes.
#   train/stage1_align.sh RECIPE OUT [key=value ...]      (NPROC=N to choose the process count)
set -euo pipefail
recipe=${1:?usage: $0 RECIPE OUT [key=value ...]}; out=${2:?usage: $0 RECIPE OUT [key=value ...]}; shift 2
here=$(cd "$(dirname "$0")" && pwd)
exec bash "$here/launch.sh" train --recipe "$recipe" --out "$out" --stage align "$@"
