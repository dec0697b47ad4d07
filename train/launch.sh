#!/usr/bin/env bash
# `mllm ARGS...` under the deepspeed launcher: one process per GPU, or NPROC CPU processes (gloo).
#
# Preemption (docs/reliability.md, "Cluster life"): SIGTERM or SIGUSR1 sent to this script is passed to
# the training ranks themselves (the deepspeed launcher would kill them, and SIGUSR1 would kill it); they
# finish the optimiser step, write a checkpoint and exit 75. This script then exits 75 too and, inside a
# SLURM job, requeues it (`scontrol requeue $SLURM_JOB_ID`; MLLM_REQUEUE=0 turns that off). The requeued
# job runs the same command, which resumes from the checkpoint. See train/slurm.sbatch.
set -uo pipefail
PREEMPTED=75
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
# Every preempted rank touches this file: the launcher, if the scheduler signalled it too, exits 1 itself.
marker=$(mktemp "${TMPDIR:-/tmp}/mllm-preempted.XXXXXX") && rm -f "$marker"
export MLLM_PREEMPT_MARKER=$marker

deepspeed --no_local_rank --num_gpus "$NPROC" --master_port "$port" --module mllm.cli "$@" &
launcher=$!

ranks=""
forward() {  # the ranks are the launcher's grandchildren (deepspeed -> launch.py -> ranks)
  local sig=$1 child rank
  echo "launch.sh: SIG$sig received, passing it to the training ranks" >&2
  for child in $(ps -o pid= --ppid "$launcher" 2>/dev/null); do
    for rank in $(ps -o pid= --ppid "$child" 2>/dev/null); do
      kill -s "$sig" "$rank" 2>/dev/null || true
      case " $ranks " in *" $rank "*) ;; *) ranks="$ranks $rank" ;; esac
    done
  done
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap 'forward INT' INT

while true; do  # `wait` also returns when a trap ran (status > 128): then wait again
  wait "$launcher"
  rc=$?
  if [ "$rc" -gt 128 ] && kill -0 "$launcher" 2>/dev/null; then
    continue
  fi
  if [ "$rc" -gt 128 ]; then  # it ended during the trap: its own status is still kept for one `wait`
    wait "$launcher"
    again=$?
    [ "$again" -ne 127 ] && rc=$again
  fi
  break
done
# The launcher, signalled too (SLURM signals every process of the job), may end before its ranks have
# written their checkpoint: wait for the ranks this script signalled (at most MLLM_PREEMPT_WAIT_S).
deadline=$(( $(date +%s) + ${MLLM_PREEMPT_WAIT_S:-600} ))
for rank in $ranks; do
  while kill -0 "$rank" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do
    sleep 0.5
  done
done
if [ "$rc" -ne 0 ] && [ -e "$marker" ]; then
  rc=$PREEMPTED
fi
rm -f "$marker"
if [ "$rc" -eq "$PREEMPTED" ]; then
  if [ -n "${SLURM_JOB_ID:-}" ] && [ "${MLLM_REQUEUE:-1}" != 0 ] && command -v scontrol >/dev/null 2>&1; then
    echo "launch.sh: preempted; requeueing SLURM job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
  else
    echo "launch.sh: preempted; run the same command again to resume" >&2
  fi
fi
exit "$rc"
