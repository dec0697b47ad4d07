"""Checkpoint folders that are complete or absent: written under a temporary name, then renamed.

`latest` is a one-line file replaced atomically after the rename, so it can only ever name a
complete checkpoint. Temporary folders start with `.tmp-` and are never read as checkpoints; ones
left by a killed run are removed when the next run opens the folder.

Storage can fail (a full disk, an I/O error) and files can change after the commit, so: a failed
write is aborted (its temporary folder removed) and never touches the committed checkpoints; old ones
are pruned only after the new one is committed, and never the newest; the manifest (mllm.training.
manifest) is written into the folder before the rename; a checkpoint that fails its manifest is
refused at resume (the engine falls back to an older one; the folder stays as it is for a person).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from mllm.training.faults import maybe_kill
from mllm.training.manifest import Entries, write_manifest

STEP_RE = re.compile(r"^step-(\d{8})$")
SUPERSEDED_PREFIX = "superseded-"  # a committed checkpoint of a step being written again, until that commits


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (the storage failed), or none that exists can be trusted."""


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
        """Remove temporary folders a killed run left behind (call on rank 0 before training). A checkpoint
        set aside for a rewrite of its step that never committed is put back."""
        removed = []
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(".tmp-"):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                    removed.append(p)
                elif p.name.startswith(SUPERSEDED_PREFIX):
                    original = self.root / p.name[len(SUPERSEDED_PREFIX) :]
                    if original.exists():
                        shutil.rmtree(p, ignore_errors=True)
                        removed.append(p)
                    else:
                        os.replace(p, original)
        return removed

    def begin(self, step: int) -> Path:
        tmp = self.tmp_path(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int, manifest: Entries | None = None) -> Path:
        """Write the manifest, flush, rename the finished temporary folder into place (the commit), point
        `latest` at it, then prune. A checkpoint of the same step already there (a step redone after a
        resume) is moved aside first and removed only after the new one is in place."""
        tmp = self.tmp_path(step)
        final = self.root / self.name(step)
        if manifest is not None:
            write_manifest(tmp, manifest)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        aside = self.root / f"{SUPERSEDED_PREFIX}{self.name(step)}"
        if final.exists():
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        maybe_kill("before_latest", step)
        atomic_write_text(self.root / "latest", final.name + "\n")
        shutil.rmtree(aside, ignore_errors=True)
        self.prune()
        return final

    def abort(self, step: int) -> None:
        """Drop a checkpoint write that failed: its temporary folder goes, committed ones are untouched."""
        shutil.rmtree(self.tmp_path(step), ignore_errors=True)

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

    def candidates(self) -> list[Path]:
        """Checkpoints to resume from, best first: `latest()`, then the older ones, newest first."""
        first = self.latest()
        if first is None:
            return []
        rest = [self.root / self.name(s) for s in reversed(self.steps())]
        return [first] + [p for p in rest if p != first]

    def prune(self) -> None:
        """Keep the newest `keep_last` checkpoints. Called only after a commit, so the newest is the one
        just written and the previous good one is deleted only once a newer one is on disk."""
        keep = self.latest()
        for step in self.steps()[: -self.keep_last]:
            path = self.root / self.name(step)
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)
