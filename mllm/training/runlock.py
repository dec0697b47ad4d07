"""One writer per run folder: `RUN/train.lock` names the host and process that trains it.

Two `mllm train` processes on one folder (a requeued job starting while the old one still saves, a
second launch by hand) would interleave checkpoints, truncate each other's metrics and prune each
other's checkpoints. The lock is a file created with O_EXCL (atomic on local and NFS filesystems),
holding {host, pid, process start time, nonce}; the second process refuses with the first one's host
and pid.

A killed process cannot leave the folder stuck, because a lock is stale when:
- its host is this host and its pid is gone, or the pid now belongs to a younger process (pid reuse);
- its host is another host (a requeued job usually lands elsewhere, and a pid there cannot be checked)
  and its heartbeat is old: the holder touches the file every `HEARTBEAT_S` seconds from a thread, and
  one untouched for `STALE_S` seconds is taken over.
A stale lock is taken over by renaming it aside first (only one of two racing processes can), then
creating a fresh one.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

LOCK_NAME = "train.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class RunLocked(RuntimeError):
    """Another live process trains this run folder."""


def _start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), to tell a pid from a reused one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class RunLock:
    """Acquire with `acquire()` (or as a context manager); `release()` removes it if it is still ours."""

    def __init__(self, run_dir: str | Path, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.path = Path(run_dir) / LOCK_NAME
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": _start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "nonce": secrets.token_hex(8),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict[str, Any] | None = None  # the stale lock replaced, for the log

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return self
            held = self._read()
            if held is None:  # vanished or half-written between our attempt and the read: try again
                time.sleep(0.05)
                continue
            why = self.stale_reason(held)
            if why is None:
                raise RunLocked(self.describe(held))
            if self._take_over(held):
                self.took_over = dict(held, reason=why)
        raise RunLocked(f"{self.path}: could not take the lock (another process is racing for it)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        held = self._read()
        if held is not None and held.get("nonce") == self.info["nonce"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------ the file
    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.info) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self, path: Path | None = None) -> dict[str, Any] | None:
        path = path or self.path
        try:
            data = json.loads(path.read_text())
            data["heartbeat_age_s"] = time.time() - path.stat().st_mtime
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _take_over(self, held: dict[str, Any]) -> bool:
        """Move the stale lock aside, if it is still the one judged stale (same nonce)."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.info['nonce']}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return False
        moved = self._read(aside)
        if moved is not None and moved.get("nonce") != held.get("nonce"):
            # A racing process replaced it in between: that lock is live. Put it back if the place is free.
            try:
                os.link(aside, self.path)
            except OSError:
                pass
        aside.unlink(missing_ok=True)
        return True

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="mllm-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass

    # ------------------------------------------------------------------ judging a held lock
    def stale_reason(self, held: dict[str, Any]) -> str | None:
        """Why the lock `held` is stale, or None while its holder may still be alive."""
        pid = held.get("pid")
        if held.get("host") == self.info["host"] and isinstance(pid, int):
            if not _alive(pid):
                return f"pid {pid} on this host is gone"
            start = _start_time(pid)
            if held.get("start_time") is not None and start is not None and start != held["start_time"]:
                return f"pid {pid} on this host now belongs to another process"
            return None
        age = float(held.get("heartbeat_age_s", 0.0))
        if age > self.stale_s:
            return f"no heartbeat from host {held.get('host')} for {age:.0f} s (stale after {self.stale_s:.0f} s)"
        return None

    def describe(self, held: dict[str, Any]) -> str:
        return (
            f"{self.path.parent} is being trained by pid {held.get('pid')} on host {held.get('host')} "
            f"(since {held.get('since')}, heartbeat {held.get('heartbeat_age_s', 0):.0f} s ago; lock "
            f"{self.path}); one writer per run folder: wait for it, or use another --out"
        )
