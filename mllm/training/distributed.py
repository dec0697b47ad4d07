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


class DistributedError(RuntimeError):
    """A collective failed: another process died (connection reset) or went silent (timeout)."""


_TIMEOUT_S: int | None = None


def comm_failure(e: BaseException) -> bool:
    """Whether `e` is a collective failing because of a peer (gloo and NCCL errors, timeouts)."""
    if isinstance(e, DistributedError | getattr(dist, "DistBackendError", DistributedError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(k in text for k in (
        "gloo", "Gloo", "NCCL", "Connection reset", "Connection closed", "Timed out", "timed out", "Broken pipe"))


def explain(e: BaseException, what: str = "a collective") -> DistributedError:
    """The one message a survivor prints: who it is, what failed, the likely cause, the bound."""
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    return DistributedError(
        f"rank {rank()} of {world_size()}: lost contact with the other processes during {what} ({first}). "
        f"Another rank most likely died (see its log) or stopped responding; a silent peer is waited for "
        f"at most engine.dist_timeout_s={_TIMEOUT_S} s.")


def init(backend: str, timeout_s: int) -> None:
    """Initialise the default process group once (gloo on CPU, nccl on GPU).

    `timeout_s` bounds every collective: gloo raises when a peer is silent that long, and NCCL's
    watchdog (TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default) aborts the process, so a dead rank cannot
    leave the others hanging forever."""
    global _TIMEOUT_S
    ensure_env()
    if dist.is_initialized():
        return
    _TIMEOUT_S = timeout_s
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
        try:
            dist.barrier()
        except RuntimeError as e:
            raise (explain(e, "a barrier") if comm_failure(e) else e) from e


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        try:
            dist.all_reduce(x)
        except RuntimeError as e:
            raise (explain(e, "an all-reduce") if comm_failure(e) else e) from e
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
