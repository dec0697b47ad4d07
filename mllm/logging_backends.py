"""Metric sinks beside `metrics.jsonl` (TensorBoard, Weights & Biases) and the run's provenance.

`metrics.jsonl` is always written by the engine itself (it is the record resume and `mllm report`
read). The sinks here are for people watching a run: each is one registry entry, opened only when
the recipe names it (`engine.loggers: [jsonl, tensorboard, wandb]`), and a named sink whose package
is missing stops the run before the first step instead of training blind.

`environment_info()` is what a run folder records about where it ran (`env.json`): the git revision
and whether the tree was dirty, the versions of the stack, the hardware and the world size, so a
result can be traced to the code and machine that produced it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from encoders.registry import Registry

__all__ = ["LOGGERS", "Loggers", "environment_info", "flatten_metrics", "git_revision", "open_loggers"]


def flatten_metrics(rec: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a metrics record as `a/b` scalars (`lr: {projector: 1e-3}` -> `lr/projector`)."""
    out: dict[str, float] = {}
    for k, v in rec.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_metrics(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
            out[key] = float(v)
    return out


class _Sink:
    def log(self, scalars: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _TensorBoard(_Sink):
    def __init__(self, out_dir: Path, stage: str, resume_step: int):
        try:  # optional (the `logging` extra): imported when a recipe names the sink
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ValueError(
                "engine.loggers names 'tensorboard' but the tensorboard package is not installed "
                "(pip install tensorboard, or the 'logging' extra: pip install 'mllm[logging]')"
            ) from e
        # purge_step drops events past the checkpoint a resumed run restarts from, as metrics.jsonl does.
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step or None)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb(_Sink):
    def __init__(self, out_dir: Path, stage: str, resume_step: int):
        try:  # optional (the `logging` extra): imported when a recipe names the sink
            import wandb
        except ImportError as e:
            raise ValueError(
                "engine.loggers names 'wandb' but the wandb package is not installed (pip install "
                "wandb, or 'mllm[logging]'); WANDB_MODE=offline logs without a network"
            ) from e
        self.wandb = wandb
        run_dir = out_dir.parent
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "mllm"),
            name=f"{run_dir.name}/{stage}",
            dir=str(out_dir),
            group=run_dir.name,
            job_type=stage,
            reinit="finish_previous",
            config={"stage": stage, "resumed_from": resume_step},
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


SinkFactory = Callable[[Path, str, int], _Sink | None]
LOGGERS: Registry[SinkFactory] = Registry("logger")
LOGGERS.register("jsonl", lambda out_dir, stage, step: None)  # written by the engine itself, always
LOGGERS.register("tensorboard", _TensorBoard)
LOGGERS.register("wandb", _Wandb)


class Loggers:
    """The opened sinks of one stage; `log` fans a metrics record out to each."""

    def __init__(self, sinks: list[_Sink]):
        self.sinks = sinks

    def log(self, rec: dict[str, Any], step: int) -> None:
        if self.sinks:
            scalars = flatten_metrics(rec)
            for sink in self.sinks:
                sink.log(scalars, step)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()


def open_loggers(names: list[str], out_dir: str | Path, stage: str, resume_step: int = 0) -> Loggers:
    """Open every sink in `names` for a stage writing to `out_dir`; unknown or uninstalled ones are errors."""
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ValueError(f"engine.loggers: unknown {unknown}; known: {LOGGERS.known()}")
    sinks = [
        s for n in dict.fromkeys(names) if (s := LOGGERS[n](Path(out_dir), stage, resume_step)) is not None
    ]
    return Loggers(sinks)


# ------------------------------------------------------------------------------------------ provenance
def git_revision(repo: str | Path) -> dict[str, Any] | None:
    """{"commit", "dirty"} of the checkout at `repo`, or None outside a git checkout (an installed wheel)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


#: the CPU features that decide this project's CPU speeds (bf16 is 2.7x faster only with avx512_bf16)
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")


def cpu_flags() -> list[str]:
    """Which of SPEED_FLAGS this CPU has: beside every absolute time, since machines of one kind differ."""
    have = set((_cpuinfo_field("flags") or "").split())
    return [f for f in SPEED_FLAGS if f in have]


def environment_info(world_size: int = 1) -> dict[str, Any]:
    """Where this process runs: code revision, package versions, hardware, world size."""
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "git": git_revision(Path(__file__).resolve().parents[1]),
        "python": platform.python_version(),
        "packages": {
            p: _version(p)
            for p in (
                "mllm",
                "torch",
                "transformers",
                "deepspeed",
                "peft",
                "accelerate",
                "tokenizers",
                "safetensors",
            )
        },
        "platform": platform.platform(),
        "cpu": {
            "name": cpu_name(),
            "flags": cpu_flags(),
            "count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "gpus": gpus,
        "cuda": torch.version.cuda,
        "world_size": world_size,
    }
