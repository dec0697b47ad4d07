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
Signal points send this process a signal, as a scheduler does (tests preemption):
  term_mid_step, usr1_mid_step    SIGTERM / SIGUSR1 after the step's first micro-batch, before its update
  term_mid_checkpoint             SIGTERM inside the checkpoint write (a second signal during the save)
Storage points make the checkpoint write of that step fail part-way (`failing_write`):
  enospc_checkpoint, eio_checkpoint   half of a file written, then OSError ENOSPC / EIO naming it
Unset (the normal case) each check costs one dictionary lookup.

`MLLM_TRACE_SAMPLES=DIR` (a test hook, not a fault): each rank appends the sample ids of every
micro-batch it trains to DIR/rank<R>.jsonl, so a test can check which samples a run saw.
"""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path
from typing import Any

KILL_POINTS = ("after_step", "mid_checkpoint", "before_latest", "mid_metrics")
HANG_POINTS = tuple(f"hang_{p}" for p in KILL_POINTS)
VALUE_POINTS = ("nan_loss",)
SIGNAL_POINTS = {
    "term_mid_step": signal.SIGTERM,
    "usr1_mid_step": signal.SIGUSR1,
    "term_mid_checkpoint": signal.SIGTERM,
}
STORAGE_POINTS = {"enospc_checkpoint": errno.ENOSPC, "eio_checkpoint": errno.EIO}
ALL_POINTS = KILL_POINTS + HANG_POINTS + VALUE_POINTS + tuple(SIGNAL_POINTS) + tuple(STORAGE_POINTS)


def _specs() -> list[tuple[str, int]]:
    spec = os.environ.get("MLLM_FAULT")
    if not spec:
        return []
    out = []
    for part in spec.split(","):
        point, _, step = part.strip().partition(":")
        if point not in ALL_POINTS or not step.isdigit():
            raise ValueError(
                f"MLLM_FAULT: bad entry {part!r}; expected point:step with point in {ALL_POINTS}"
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


def maybe_signal(point: str, step: int) -> None:
    """Send this process the signal of `point` (SIGNAL_POINTS) when asked for at `step`."""
    if injected(point, step):
        os.kill(os.getpid(), SIGNAL_POINTS[point])


def failing_write(step: int, path: Path, data: bytes) -> None:
    """Write `data` to `path`; under an injected storage fault for `step`, write half of it and raise the
    OSError a full disk (ENOSPC) or a failing device (EIO) gives, naming the file, as a real one does."""
    for point, code in STORAGE_POINTS.items():
        if injected(point, step):
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(code, os.strerror(code), str(path))
    with open(path, "wb") as f:
        f.write(data)


def trace_samples(step: int, rank: int, ids: list[Any]) -> None:
    """Record the sample ids a rank trains at `step` (only when MLLM_TRACE_SAMPLES names a folder)."""
    folder = os.environ.get("MLLM_TRACE_SAMPLES")
    if folder:
        with open(Path(folder) / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "rank": rank, "ids": ids}) + "\n")
