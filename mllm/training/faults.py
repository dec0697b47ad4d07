"""Fault injection for the kill-and-resume tests: `MLLM_FAULT=point:step` SIGKILLs this process when
training reaches `point` at `step`. Points: `after_step` (after the optimiser step and its metrics
line) and `mid_checkpoint` (inside a checkpoint write, after some files exist, before the rename).
Unset (the normal case) it costs one dictionary lookup."""

from __future__ import annotations

import os
import signal


def maybe_kill(point: str, step: int) -> None:
    spec = os.environ.get("MLLM_FAULT")
    if not spec:
        return
    want_point, _, want_step = spec.partition(":")
    if want_point == point and want_step and int(want_step) == step:
        os.kill(os.getpid(), signal.SIGKILL)
