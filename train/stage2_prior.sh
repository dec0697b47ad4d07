#!/usr/bin/env bash
# PRIOR alignment (stage `prior`: projector only, PRIOR-weighted caption loss) under the deepspeed
# launcher, on any number of GPUs or CPU processes. The stage computes (rank 0) or loads its weight cache
# first; see mllm/prior.py for its settings.
#   train/stage2_prior.sh RECIPE OUT [key=value ...]      (NPROC=N to choose the process count)
set -euo pipefail
recipe=${1:?usage: $0 RECIPE OUT [key=value ...]}; out=${2:?usage: $0 RECIPE OUT [key=value ...]}; shift 2
here=$(cd "$(dirname "$0")" && pwd)
exec bash "$here/launch.sh" train --recipe "$recipe" --out "$out" --stage prior "$@"
