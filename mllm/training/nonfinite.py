"""The non-finite loss policy: detect a NaN/inf loss before it reaches the weights, then skip or stop.

The check runs on each micro-batch's loss *before* backward, and every rank takes the same decision
(a flag all-reduced across the group): one rank skipping while another steps would desynchronise the
collectives. Under plain torch a skipped step is simple (no backward for the bad micro-batch, grads
zeroed, no optimiser or schedule step). Under DeepSpeed, `engine.step()` owns the update, so the bad
micro-batch is still back-propagated: its non-finite gradients trip DeepSpeed's own overflow check,
which drops the step, clears the gradients and does not advance the schedule. The engine verifies that
DeepSpeed really dropped it (`engine.skipped_steps`) and stops with an error if it did not, rather
than continue from poisoned weights.
"""

from __future__ import annotations

import torch

from mllm.config import NonfiniteConfig
from mllm.training import distributed as D

POLICIES = ("stop", "skip")


class NonfiniteError(RuntimeError):
    """Training cannot continue: a non-finite loss under `stop`, or too many skipped steps."""


class NonfiniteGuard:
    """Decides per micro-batch; remembers the dropped steps (saved in checkpoints, so resume counts on)."""

    def __init__(self, cfg: NonfiniteConfig):
        if cfg.policy not in POLICIES:
            raise ValueError(f"engine.nonfinite.policy must be one of {POLICIES}, got {cfg.policy!r}")
        if cfg.max_skips < 0:
            raise ValueError(f"engine.nonfinite.max_skips must be >= 0, got {cfg.max_skips}")
        self.cfg = cfg
        self.skipped: list[int] = []

    @property
    def stop(self) -> bool:
        return self.cfg.policy == "stop"

    def all_finite(self, loss: torch.Tensor) -> bool:
        """True when the loss is finite on every rank (one scalar all-reduce when distributed)."""
        bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        return float(D.all_reduce_mean(bad)) == 0.0

    def record_skip(self, step: int, why: str) -> None:
        self.skipped.append(step)
        if len(self.skipped) > self.cfg.max_skips:
            raise NonfiniteError(
                f"{why} at step {step}: {len(self.skipped)} steps skipped for non-finite values "
                f"({self.skipped[:20]}), more than engine.nonfinite.max_skips={self.cfg.max_skips}"
            )
