"""Process-group set-up that works the same with a launcher (deepspeed, torchrun) and without one."""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_cuda() -> bool:
    return torch.cuda.is_available()


def ensure_env() -> None:
    """Single-process defaults so DeepSpeed does not go looking for MPI when run without a launcher."""
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    if not has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init(backend: str, timeout_s: int) -> None:
    """Initialise the default process group once (gloo on CPU, nccl on GPU)."""
    ensure_env()
    if dist.is_initialized():
        return
    timeout = timedelta(seconds=timeout_s)
    if backend == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if has_cuda() else "gloo", timeout=timeout,
                                   auto_mpi_discovery=False, verbose=False)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if has_cuda() else "gloo", timeout=timeout)
    if has_cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def device() -> torch.device:
    if has_cuda():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


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
