#!/usr/bin/env bash
# `mllm ARGS...` under the deepspeed launcher: one process per GPU, or NPROC CPU processes (gloo).
set -euo pipefail
if [ -z "${NPROC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC=$(nvidia-smi -L | wc -l)
  else
    NPROC=1
  fi
fi
port=${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi
exec deepspeed --no_local_rank --num_gpus "$NPROC" --master_port "$port" --module mllm.cli "$@"
