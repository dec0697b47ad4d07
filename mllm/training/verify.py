"""`mllm ckpt verify RUN`: every checkpoint of a run checked against its manifest, without training.

The same check a resume makes (mllm.training.manifest), run by hand: after a storage incident, before
copying a run elsewhere, or to see which checkpoint a requeued job will resume from. Accepts a run
folder, a stage folder, a `checkpoints/` folder or one checkpoint folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mllm.training.checkpoint import STEP_RE, CheckpointManager
from mllm.training.manifest import extras, read_manifest, verify


@dataclass
class Verdict:
    path: Path
    status: str  # ok | bad | unverifiable
    problems: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0


def _checkpoint_roots(path: Path) -> list[Path]:
    """The `checkpoints/` folders under `path` (one checkpoint folder counts as its parent's)."""
    if STEP_RE.match(path.name) and path.is_dir():
        return [path.parent]
    if path.name == "checkpoints" and path.is_dir():
        return [path]
    if (path / "checkpoints").is_dir():
        return [path / "checkpoints"]
    return sorted(p for p in path.glob("*/checkpoints") if p.is_dir())


def check_checkpoint(path: Path) -> Verdict:
    try:
        entries = read_manifest(path)
    except (ValueError, OSError):
        entries = {}
    if entries is None:
        return Verdict(path, "unverifiable", ["no manifest.json (written before checksums)"])
    problems = verify(path)
    return Verdict(
        path,
        "bad" if problems else "ok",
        problems,
        extras(path),
        len(entries),
        sum(int(e.get("bytes", 0)) for e in entries.values()),
    )


def verify_run(path: str | Path) -> tuple[list[Verdict], dict[Path, Path | None]]:
    """Verdicts for every checkpoint under `path` (just that one, for a checkpoint folder), and per `checkpoints/` folder the one
    a resume would use (the newest that is not bad, as the engine chooses; None: none usable)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run folder")
    single = path if STEP_RE.match(path.name) and path.is_dir() else None
    verdicts: list[Verdict] = []
    resume_from: dict[Path, Path | None] = {}
    for root in _checkpoint_roots(path):
        manager = CheckpointManager(root)
        chosen = None
        for ckpt in manager.candidates():
            if single is not None and ckpt != single:
                continue
            v = check_checkpoint(ckpt)
            verdicts.append(v)
            if chosen is None and v.status != "bad":
                chosen = ckpt
        resume_from[root] = chosen
    if not verdicts:
        raise FileNotFoundError(f"{path}: holds no checkpoint (no */checkpoints/step-* folder)")
    return verdicts, resume_from


def render(verdicts: list[Verdict], resume_from: dict[Path, Path | None]) -> str:
    lines = []
    for v in verdicts:
        if v.status == "ok":
            lines.append(f"ok    {v.path}  ({v.files} files, {v.bytes / 1e6:.1f} MB)")
        elif v.status == "unverifiable":
            lines.append(f"old   {v.path}  {v.problems[0]}: not verifiable")
        else:
            lines.append(f"BAD   {v.path}")
            lines.extend(f"        {p}" for p in v.problems)
        lines.extend(
            f"        note: {rel} is not in the manifest (added later; a resume does not read it)"
            for rel in v.extra
        )
    for root, chosen in resume_from.items():
        lines.append(
            f"resume {root.parent.name}: " + (f"from {chosen.name}" if chosen else "no usable checkpoint")
        )
    counts = {s: sum(v.status == s for v in verdicts) for s in ("ok", "bad", "unverifiable")}
    lines.append(
        f"{len(verdicts)} checkpoint(s): {counts['ok']} ok, {counts['bad']} bad, {counts['unverifiable']} unverifiable"
    )
    return "\n".join(lines)
