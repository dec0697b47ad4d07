"""Preemption: a scheduler's signal becomes "finish this optimiser step, checkpoint, exit 75".

Schedulers warn before they kill: SLURM sends SIGTERM and kills `KillWait` seconds later (SIGUSR1 ahead
of time with `--signal=USR1@120`), Kubernetes SIGTERM and `terminationGracePeriodSeconds`. A run that
ignores the warning loses everything since its last periodic checkpoint. Here the handler only records
the signal; the training loop looks at the record after each optimiser step, so a step is never cut in
half, and the checkpoint is written by the loop itself, outside any handler. A second signal while the
checkpoint is written is recorded and otherwise ignored (the default action, death, would tear nothing,
since the write commits by a rename, but it would lose the checkpoint). The run then exits with
`PREEMPTED_EXIT` (75, EX_TEMPFAIL: "try again later"), which `train/launch.sh` turns into a requeue.

Every rank takes part: the decision is all-reduced once a step, so a signal that reached only one rank
(the others' launcher swallowed it, or it arrived a moment later) still stops all of them at the same
step, and they write the checkpoint together.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from mllm.config import parse_signal
from mllm.training import distributed as D

PREEMPTED_EXIT = 75  # os.EX_TEMPFAIL: a job script requeues on it (train/launch.sh)
# A file every preempted rank touches when the environment names one: train/launch.sh reads it, because
# the deepspeed launcher, signalled itself, reports its own exit status (1), not its ranks' 75.
MARKER_ENV = "MLLM_PREEMPT_MARKER"


class Preempted(Exception):
    """The run stopped on a preemption signal after writing a checkpoint (or with nothing new to write)."""

    def __init__(self, signame: str, stage: str | None, step: int | None, checkpoint: Path | None):
        self.signame, self.stage, self.step, self.checkpoint = signame, stage, step, checkpoint
        where = f"stage {stage!r} at step {step}" if stage is not None else "between stages"
        saved = f"checkpoint {checkpoint}" if checkpoint is not None else "no new checkpoint needed"
        super().__init__(
            f"preempted by {signame}: stopped {where}, {saved}; run the same command again to resume "
            f"(exit status {PREEMPTED_EXIT})"
        )


class PreemptionWatch:
    """Records the configured signals while active (a context manager); `agreed()` asks all ranks."""

    def __init__(self, signals: list[str]):
        self.signals = [parse_signal(s, "engine.preemption_signals") for s in signals]
        self.received: list[str] = []
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> PreemptionWatch:
        # signal.signal works only in the main thread; elsewhere (a library caller's worker thread) the
        # run simply keeps the signals' default actions.
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        # os.write, not print: a handler can run in the middle of another print to the same stream.
        if len(self.received) == 1:
            msg = f"mllm train: {name} received: finishing the optimiser step, then checkpoint and exit\n"
        else:
            msg = f"mllm train: {name} received again: already stopping; the checkpoint is not interrupted\n"
        try:
            os.write(2, msg.encode())
        except OSError:
            pass

    @property
    def signame(self) -> str:
        return self.received[0] if self.received else "a signal on another rank"

    def requested(self) -> bool:
        """Whether this process got a signal (no communication)."""
        return bool(self.received)

    def agreed(self) -> bool:
        """Whether any rank got a signal: one scalar all-reduce when distributed, so all ranks must call it
        at the same point (the loop does, once per optimiser step)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=D.device())
        return float(D.all_reduce_mean(flag)) > 0.0


def ignore_in_worker(signals: list[int], worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a scheduler signals every process of the job, and a worker that dies
    of it would fail the step the main process is finishing; the main process ends the workers itself."""
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def touch_marker() -> None:
    """Leave the file `MLLM_PREEMPT_MARKER` names, if any (see MARKER_ENV)."""
    path = os.environ.get(MARKER_ENV)
    if path:
        try:
            Path(path).touch()
        except OSError:
            pass
