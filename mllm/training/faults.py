"""Fault injection for the reliability tests: `MLLM_FAULT=point:step[,point:step...]`.

Kill points SIGKILL this process when training reaches `point` at `step` (nothing is flushed, no
handler runs: the same as a power cut or the OOM killer):
  after_step      after the optimiser step, its metrics line and any checkpoint of that step
  mid_checkpoint  inside a checkpoint write, after some files exist, before the rename
  before_latest   after the checkpoint folder is renamed into place, before `latest` is updated
  mid_metrics     halfway through writing the step's metrics line (a torn last line)
`hang_<point>` (e.g. `hang_after_step`) SIGSTOPs the process there instead: alive but silent, as a
deadlocked or swapped-out rank is (the distributed-timeout test).
Numerical points change a value instead (see `injected`):
  nan_loss        the loss of the step's first micro-batch becomes NaN (tests the non-finite policy)
Unset (the normal case) each check costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

KILL_POINTS = ("after_step", "mid_checkpoint", "before_latest", "mid_metrics")
HANG_POINTS = tuple(f"hang_{p}" for p in KILL_POINTS)
VALUE_POINTS = ("nan_loss",)


def _specs() -> list[tuple[str, int]]:
    spec = os.environ.get("MLLM_FAULT")
    if not spec:
        return []
    out = []
    for part in spec.split(","):
        point, _, step = part.strip().partition(":")
        if point not in KILL_POINTS + HANG_POINTS + VALUE_POINTS or not step.isdigit():
            raise ValueError(
                f"MLLM_FAULT: bad entry {part!r}; expected point:step with point in "
                f"{KILL_POINTS + HANG_POINTS + VALUE_POINTS}"
            )
        out.append((point, int(step)))
    return out


def injected(point: str, step: int) -> bool:
    """Whether `MLLM_FAULT` asks for `point` at `step` (value faults: the caller changes the value)."""
    if not os.environ.get("MLLM_FAULT"):
        return False
    return (point, step) in _specs()


def maybe_kill(point: str, step: int) -> None:
    if injected(point, step):
        os.kill(os.getpid(), signal.SIGKILL)
    if injected(f"hang_{point}", step):
        os.kill(os.getpid(), signal.SIGSTOP)
