"""A checkpoint's manifest: the size and sha256 of every file in it, written with it, checked before use.

A checkpoint is trusted for hours or weeks after it is written, on storage that fails in ways the rename
commit cannot see: a file truncated by a full quota, a block rotted on disk, a file deleted by a cleanup
script. Resume reads the manifest first and refuses a checkpoint whose file changed or vanished, naming
the file, so a bad checkpoint is never half-loaded into a run. sha256 (OpenSSL, about 1.4 GB/s a core
here) in 1 MiB chunks, so memory stays flat however large a file is; the training engine spreads the
files over its ranks, so a checkpoint is hashed in parallel.

`manifest.json` sits inside the checkpoint folder and lists every other file by its path relative to it.
A checkpoint without one (written before checksums existed) is reported as unverifiable, not as bad.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from encoders.common import read_meta, write_meta

MANIFEST = "manifest.json"
MANIFEST_KIND = "checkpoint_manifest"
MANIFEST_VERSION = 1
ALGORITHM = "sha256"
CHUNK = 1 << 20

#: relative path -> {"bytes": size, "sha256": hex digest}
Entries = dict[str, dict[str, Any]]


def file_digest(path: Path) -> str:
    """sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_files(folder: Path) -> list[str]:
    """Every regular file under `folder` but the manifest, as sorted POSIX paths relative to it."""
    folder = Path(folder)
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def hash_files(folder: Path, rels: Iterable[str]) -> Entries:
    """The manifest entries of `rels` (paths relative to `folder`), as the files are now."""
    folder = Path(folder)
    return {
        rel: {"bytes": (folder / rel).stat().st_size, ALGORITHM: file_digest(folder / rel)} for rel in rels
    }


def write_manifest(folder: Path, entries: Entries) -> None:
    write_meta(
        Path(folder) / MANIFEST, MANIFEST_KIND, MANIFEST_VERSION, {"algorithm": ALGORITHM, "files": entries}
    )


def read_manifest(folder: Path) -> Entries | None:
    """The entries of `folder`'s manifest; None when it has none (a checkpoint from before checksums)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    meta = read_meta(path, MANIFEST_KIND, MANIFEST_VERSION)
    if meta.get("algorithm") != ALGORITHM:
        raise ValueError(
            f"{path}: checksum algorithm {meta.get('algorithm')!r}, this version reads {ALGORITHM}"
        )
    return dict(meta["files"])


def check_files(folder: Path, entries: Entries) -> list[str]:
    """What is wrong with `entries`' files in `folder` now: one line each, naming the file (empty: all good)."""
    folder = Path(folder)
    problems = []
    for rel, want in entries.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{path}: vanished (listed in {MANIFEST})")
            continue
        try:
            size = path.stat().st_size
            if size != want["bytes"]:
                problems.append(
                    f"{path}: {size} bytes, {MANIFEST} says {want['bytes']} (truncated or rewritten)"
                )
            elif file_digest(path) != want[ALGORITHM]:
                problems.append(f"{path}: contents changed ({ALGORITHM} differs from {MANIFEST})")
        except OSError as e:  # an I/O error reading it back is a finding, not a crash of the check
            problems.append(f"{path}: unreadable ({e.strerror or e})")
    return problems


def verify(folder: Path) -> list[str]:
    """Every problem of a checkpoint folder (empty: it is as written). A missing or unreadable manifest is
    one problem; use `read_manifest` first to tell an old, unverifiable checkpoint from a damaged one."""
    try:
        entries = read_manifest(folder)
    except (ValueError, OSError) as e:
        return [f"{Path(folder) / MANIFEST}: unreadable ({e})"]
    if entries is None:
        return [f"{Path(folder) / MANIFEST}: missing"]
    return check_files(folder, entries)


def extras(folder: Path) -> list[str]:
    """Files in `folder` that its manifest does not list (added after the commit; not read by resume)."""
    try:
        entries = read_manifest(folder) or {}
    except (ValueError, OSError):
        return []
    return [rel for rel in list_files(folder) if rel not in entries]
