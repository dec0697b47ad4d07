"""Shared timing helpers for bench/*.py: alternate, repeat, take medians, print one RESULT line.

Every benchmark runs its contenders in the same process, alternating (A B A B ...), so a neighbour
that loads the machine for a while slows both alike instead of whichever ran then; medians ignore
the odd outlier. The last line a benchmark prints is `RESULT {json}`.

Benchmarks import the installed `mllm` (install.sh installs the checkout, editable), never a path patched
into sys.path; `_common` and `_pair` import as siblings because Python puts a script's folder first on it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def alternate(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Run each fn `warmup` times (untimed), then `repeats` rounds of all fns in turn; seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k, fn in fns.items():
            dt, _ = timed(fn, device)
            times[k].append(dt)
        if log:
            log(f"round {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()))
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def matmul_peak(
    dtype: torch.dtype, device: torch.device | str = "cpu", n: int | None = None, repeats: int = 5
) -> float:
    """FLOP/s of a large square matmul (2 n^3 per product), best of `repeats` after one warm-up.

    The best, not the median: it estimates what the hardware can do, the ceiling MFU is measured against.
    """
    n = n or (2048 if torch.device(device).type == "cpu" else 8192)
    try:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b
    except RuntimeError:
        return float("nan")
    inner = 4 if torch.device(device).type == "cpu" else 50
    best = float("inf")
    for _ in range(repeats):
        dt, _ = timed(lambda: [a @ b for _ in range(inner)], device)
        best = min(best, dt / inner)
    return 2 * n**3 / best


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def machine() -> dict[str, Any]:
    """What the figures were measured on (docs/performance.md quotes it)."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "nproc": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def result(values: dict[str, Any]) -> None:
    """The benchmark's last line."""
    print("RESULT " + json.dumps(values, sort_keys=True), flush=True)
