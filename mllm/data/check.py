"""`mllm data check`: every problem in a LLaVA-format file, with where it is, before a run meets it.

Training stops at the first bad sample (or skips and lists them with `skip_bad_samples`); a check
lists them all at once, in the same words: with a tokenizer it runs the training dataset itself
(`ConversationDataset` in skip mode, images decoded, conversations tokenised), so each message is
exactly the one training would give. Without a tokenizer it runs the checks that need none (file
syntax, fields, roles, `<image>` markers against images, image paths and decoding).

Duplicate ids are a warning, not an error: nothing in training is keyed by a sample's id (it only
labels messages and skip lists), so a duplicate cannot corrupt a run; it usually means a file was
concatenated twice, which the warning points at.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm.chat import SampleError, normalise_turns
from mllm.data.batch import SKIP_KEY, is_skipped
from mllm.data.conversations import ConversationDataset, image_paths, sample_name
from mllm.data.images import ImageError, load_image, resolve_image
from mllm.data.records import DataError, read_records
from mllm.tokenizer import ensure_image_token, load_tokenizer

_MARKER = re.compile(re.escape("<image>"))


@dataclass
class Problem:
    level: str  # error | warning
    message: str  # names the file, the sample (index and id) and the field

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


def _no_preprocess(images: Sequence[Any]) -> None:
    """Images are decoded (that is the check) but not turned into tensors."""
    return None


def _duplicate_ids(path: Path, records: Sequence[Any]) -> list[Problem]:
    first: dict[Any, int] = {}
    out = []
    for i, rec in enumerate(records):
        sid = rec.get("id") if isinstance(rec, dict) else None
        if sid is None or not isinstance(sid, (str, int)):
            continue
        if sid in first:
            out.append(
                Problem("warning", f"{sample_name(path, i, rec)}: duplicate id (also sample #{first[sid]})")
            )
        else:
            first[sid] = i
    return out


def _check_without_tokenizer(path: Path, records: Sequence[Any], image_root: Path) -> list[Problem]:
    """The checks that need no tokenizer, in the order and words the dataset uses."""
    out = []
    for i, rec in enumerate(records):
        name = sample_name(path, i, rec)
        try:
            if not isinstance(rec, dict):
                raise SampleError(f"{name}: a sample must be an object")
            if "conversations" not in rec:
                raise SampleError(f"{name}: missing 'conversations'")
            turns = normalise_turns(rec["conversations"], name)
            paths = image_paths(rec)
            for p in paths:
                if not isinstance(p, str):
                    raise SampleError(f"{name}: image entry {p!r} is not a path string")
            if not any(role == "assistant" for role, _ in turns):
                raise SampleError(f"{name}: no assistant turn, nothing to learn from")
            markers = sum(len(_MARKER.findall(t)) for _, t in turns)
            if markers != len(paths):
                raise SampleError(
                    f"{name}: {markers} <image> marker(s) in the text but {len(paths)} image(s)"
                )
            for p in paths:
                try:
                    load_image(resolve_image(image_root, p))
                except ImageError as e:
                    raise SampleError(f"{name}: {e}") from e
        except SampleError as e:
            out.append(Problem("error", str(e)))
    return out


def check_file(
    path: str | Path,
    images: str | Path | None = None,
    tokenizer: Any = None,
    template: str = "chatml",
    max_length: int | None = None,
    num_image_tokens: int = 1,
    image_token: str = "<image>",
) -> list[Problem]:
    """Every problem in `path` (a LLaVA JSON list or JSONL), errors and warnings, in file order.

    `images` is the image root (default: the file's folder), as `data.images` in a recipe.
    """
    path = Path(path)
    image_root = Path(images) if images is not None else path.parent
    try:
        records = read_records(path)
    except DataError as e:
        return [Problem("error", str(e))]
    if tokenizer is None:
        problems = _check_without_tokenizer(path, records, image_root)
    else:
        image_token_id = ensure_image_token(tokenizer, image_token)
        ds = ConversationDataset(
            path,
            image_root,
            tokenizer,
            template,
            image_token_id,
            num_image_tokens,
            _no_preprocess,
            max_length,
            skip_bad_samples=True,
        )
        problems = []
        for i in range(len(ds)):
            item = ds[i]
            if is_skipped(item):
                problems.append(Problem("error", item[SKIP_KEY].reason))
    return problems + _duplicate_ids(path, records)


def run_check(
    path: str | Path,
    images: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    template: str = "chatml",
    max_length: int | None = None,
    num_image_tokens: int = 1,
    out=print,
) -> int:
    """The command: print each problem and a summary; exit status 1 when any error was found, else 0."""
    tokenizer = None
    if tokenizer_dir is not None:
        tdir = Path(tokenizer_dir)
        tokenizer = load_tokenizer(tdir / "tokenizer" if (tdir / "mllm.json").is_file() else tdir)
    problems = check_file(path, images, tokenizer, template, max_length, num_image_tokens)
    for p in problems:
        out(str(p))
    errors = sum(p.level == "error" for p in problems)
    warnings = len(problems) - errors
    try:
        n = len(read_records(path))
    except DataError:
        n = 0
    checks = "structure, images" + (
        ", tokens" if tokenizer is not None else " (no --tokenizer: tokens not checked)"
    )
    out(f"{path}: {n} samples, {errors} error(s), {warnings} warning(s) [{checks}]")
    return 1 if errors else 0
