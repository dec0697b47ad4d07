"""Checkpoint folders that are complete or absent: written under a temporary name, then renamed.

`latest` is a one-line file replaced atomically after the rename, so it can only ever name a
complete checkpoint. Temporary folders start with `.tmp-` and are never read as checkpoints; ones
left by a killed run are removed when the next run opens the folder.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from mllm.training.faults import maybe_kill

STEP_RE = re.compile(r"^step-(\d{8})$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = max(1, keep_last)

    def name(self, step: int) -> str:
        return f"step-{step:08d}"

    def tmp_path(self, step: int) -> Path:
        return self.root / f".tmp-{self.name(step)}"

    def clean_orphans(self) -> list[Path]:
        """Remove temporary folders a killed run left behind (call on rank 0 before training)."""
        removed = []
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(".tmp-"):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                    removed.append(p)
        return removed

    def begin(self, step: int) -> Path:
        tmp = self.tmp_path(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int) -> Path:
        """Rename the finished temporary folder into place, point `latest` at it, prune old ones."""
        tmp = self.tmp_path(step)
        final = self.root / self.name(step)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        maybe_kill("before_latest", step)
        atomic_write_text(self.root / "latest", final.name + "\n")
        self.prune()
        return final

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        write(self.begin(step))
        return self.commit(step)

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(
            int(m.group(1)) for p in self.root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))
        )

    def latest(self) -> Path | None:
        """The newest complete checkpoint: what `latest` names, or a newer `step-N` folder.

        The rename is the commit (a `step-N` folder is complete by construction), so a folder newer
        than the pointer means the run died between the rename and the pointer update: it is used.
        """
        pointer = self.root / "latest"
        named = None
        if pointer.is_file():
            name = pointer.read_text().strip()
            if STEP_RE.match(name) and (self.root / name).is_dir():
                named = self.root / name
        steps = self.steps()
        newest = self.root / self.name(steps[-1]) if steps else None
        if named is None or (newest is not None and newest.name > named.name):
            return newest
        return named

    def prune(self) -> None:
        for step in self.steps()[: -self.keep_last]:
            shutil.rmtree(self.root / self.name(step), ignore_errors=True)
