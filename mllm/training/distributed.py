"""Process-group set-up that works the same with a launcher (deepspeed, torchrun) and without one.

The collectives and process facts every layer uses (`barrier`, `all_reduce_mean`, `device`, `rank`, ...)
live in encoders.common and are re-exported here, so the training code reads them all from one place."""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from encoders.common import (
    DistributedError,
    all_reduce_mean,
    barrier,
    comm_failure,
    device,
    explain,
    has_cuda,
    is_main,
    rank,
    record_group_timeout,
    world_size,
)

__all__ = [
    "DistributedError",
    "all_reduce_mean",
    "barrier",
    "comm_failure",
    "device",
    "ensure_env",
    "explain",
    "free_port",
    "gather_objects",
    "has_cuda",
    "init",
    "is_main",
    "rank",
    "shutdown_and_exit",
    "world_size",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_env() -> None:
    """Single-process defaults so DeepSpeed does not go looking for MPI when run without a launcher."""
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    if not has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init(backend: str, timeout_s: int) -> None:
    """Initialise the default process group once (gloo on CPU, nccl on GPU).

    `timeout_s` bounds every collective: gloo raises when a peer is silent that long, and NCCL's
    watchdog (TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default) aborts the process, so a dead rank cannot
    leave the others hanging forever."""
    ensure_env()
    if dist.is_initialized():
        return
    record_group_timeout(timeout_s)
    timeout = timedelta(seconds=timeout_s)
    if backend == "deepspeed":
        import deepspeed  # optional (the `deepspeed` extra), and slow to import: only when asked for

        deepspeed.init_distributed(
            dist_backend="nccl" if has_cuda() else "gloo",
            timeout=timeout,
            auto_mpi_discovery=False,
            verbose=False,
        )
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if has_cuda() else "gloo", timeout=timeout)
    if has_cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank; `[obj]` in a single process. For small
    facts all ranks must agree on (a checkpoint write failed here, a file's checksum), not for tensors."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(out, obj)
    except RuntimeError as e:
        raise (explain(e, "an all-gather") if comm_failure(e) else e) from e
    return out


def shutdown_and_exit(code: int = 0) -> None:
    """Tear down and leave with `os._exit`: gloo can abort in its own shutdown after a finished run
    (exit 134), which would turn a good run into a failed command."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - teardown must not mask the run's result
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
