"""The few helpers the vision library needs of its own, so that `encoders` imports nothing from `mllm`.

`mllm` builds on these rather than keeping copies (one implementation each):

- configuration: `from_dict` builds a dataclass from plain data and refuses unknown keys with the
  dotted key that is wrong (`ConfigError`); `to_dict` is its inverse (mllm.config re-exports both);
- saving: `atomic_dir`, the temporary folder every model's `save_pretrained` writes into before it is
  renamed over the destination (mllm.model re-exports it); `write_meta` / `read_meta`, the one meta file
  of every saved folder (its `kind` and `format_version`, checked on load);
- processes: `rank`, `world_size`, `is_main` of the default process group, or of a single process when
  there is none, the collectives every layer waits on (`barrier`, `all_reduce_mean`, which explain a
  dead peer with `DistributedError`), this process's `device`, and `seed_everything`
  (mllm.training.distributed, which sets the process group up, re-exports them);
- `load_tokenizer`: a tokenizer folder, never from the network (mllm.tokenizer re-exports it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import tempfile
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoTokenizer, PreTrainedTokenizerBase

# --------------------------------------------------------------------------------------------------------
# Configuration: dataclasses from plain data
# --------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A recipe that does not match the schema, with the dotted key that is wrong."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from plain data, refusing unknown keys (a typo must not pass silently)."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}"
        )
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    tp = _strip_optional(tp)
    if value is None:
        return None
    if _is_dataclass_type(tp):
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        return tuple(value)
    if tp in (int, float, str, bool):
        return _scalar(tp, value, where)
    return value


def _scalar(tp: type, value: Any, where: str) -> Any:
    """Scalars with the conversions YAML needs (`2e-5` is a string in YAML 1.1), and no others."""
    if isinstance(value, tp) and not (tp is not bool and isinstance(value, bool)):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, str):
        try:
            return tp(value)
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------------------
# Saving: a folder appears whole or not at all
# --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """A temporary folder beside `out_dir` to write a model into, renamed over `out_dir` on success.

    A crash while saving leaves either the old folder or none, never a half-written model; every
    model kind's `save_pretrained` writes through this.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        yield tmp
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move `tmp` to `dest`, replacing an existing folder with at most a moment without either."""
    if dest.exists():
        old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


# --------------------------------------------------------------------------------------------------------
# Saving: one meta file per saved folder, with its kind and format version
# --------------------------------------------------------------------------------------------------------

# Every folder the project saves (a model of any kind, a geometric encoder, an HF export, a LoRA adapter,
# a training checkpoint, a feature or PRIOR weight cache) has exactly one JSON meta file whose first two
# keys are these. The loader names the kinds it reads and the newest format version of each; a meta
# without them was written before this convention and reads as version 0 of the kind the loader expects.
KIND_KEY = "kind"
VERSION_KEY = "format_version"


class FormatError(ValueError):
    """A saved folder this code cannot read: another kind of folder, or a newer format than it knows."""


def write_meta(
    path: str | Path, kind: str, version: int, body: Mapping[str, Any] | None = None, indent: int | None = 2
) -> dict[str, Any]:
    """Write `{"kind": kind, "format_version": version, **body}` to `path` (JSON); returns what was written.

    `body` may not carry its own kind or version: the ones given here are the truth.
    """
    meta = {KIND_KEY: kind, VERSION_KEY: int(version)}
    meta.update({k: v for k, v in (body or {}).items() if k not in (KIND_KEY, VERSION_KEY)})
    Path(path).write_text(json.dumps(meta, indent=indent))
    return meta


def read_meta(path: str | Path, kinds: str | Mapping[str, int], version: int | None = None) -> dict[str, Any]:
    """The meta file at `path`, checked: its kind is one of `kinds` and its version no newer than theirs.

    `kinds` is one kind (with `version`, the newest this code reads) or a mapping kind -> newest version;
    the first kind is what a meta without a kind (a folder saved before the convention) is taken to be,
    and a missing version is 0. The result carries both keys filled in. A missing file is
    FileNotFoundError; another kind, a newer version or a malformed file is FormatError, each naming the
    file and what to do.
    """
    path = Path(path)
    accepted = {kinds: int(version if version is not None else 0)} if isinstance(kinds, str) else dict(kinds)
    if not accepted:
        raise ValueError("read_meta needs at least one kind")
    expected = next(iter(accepted))
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: not a saved {expected!r} folder (no {path.name})")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: unreadable meta file ({e})") from e
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    kind = meta.get(KIND_KEY, expected)
    if kind not in accepted:
        names = " or ".join(repr(k) for k in accepted)
        raise FormatError(
            f"{path}: this folder holds a saved {kind!r}, not {names}; load it with the "
            f"loader of kind {kind!r} (e.g. `mllm.load_model(path, kind={kind!r})`)"
        )
    found = meta.get(VERSION_KEY, 0)
    if not isinstance(found, int) or isinstance(found, bool) or found < 0:
        raise FormatError(f"{path}: {VERSION_KEY} must be a non-negative integer, got {found!r}")
    if found > accepted[kind]:
        raise FormatError(
            f"{path}: {kind!r} {VERSION_KEY} {found} is newer than this code reads "
            f"(up to {accepted[kind]}); upgrade mllm to load it"
        )
    meta[KIND_KEY], meta[VERSION_KEY] = kind, found
    return meta


def meta_kind(path: str | Path, default: str | None = None) -> str | None:
    """The kind a meta file names (`default` for one written before the convention); None when `path` is
    not a readable meta file. For recognising a folder; loading checks it with `read_meta`."""
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return meta.get(KIND_KEY, default) if isinstance(meta, dict) else None


def meta_body(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A meta without its kind and version: what the saving code put in it."""
    return {k: v for k, v in meta.items() if k not in (KIND_KEY, VERSION_KEY)}


# --------------------------------------------------------------------------------------------------------
# Processes and seeds
# --------------------------------------------------------------------------------------------------------


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def has_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    """This process's device: its LOCAL_RANK's GPU, else the CPU."""
    if has_cuda():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class DistributedError(RuntimeError):
    """A collective failed: another process died (connection reset) or went silent (timeout)."""


def comm_failure(e: BaseException) -> bool:
    """Whether `e` is a collective failing because of a peer (gloo and NCCL errors, timeouts)."""
    if isinstance(e, DistributedError | getattr(dist, "DistBackendError", DistributedError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        k in text
        for k in (
            "gloo",
            "Gloo",
            "NCCL",
            "Connection reset",
            "Connection closed",
            "Timed out",
            "timed out",
            "Broken pipe",
        )
    )


# The timeout the process group was created with (torch offers no getter for it), recorded by whoever
# creates the group (mllm.training.distributed.init) so that `explain` can state the bound. A fact about
# the live process group, for messages only; nothing reads it as configuration.
_GROUP_TIMEOUT_S: int | None = None


def record_group_timeout(timeout_s: int | None) -> None:
    global _GROUP_TIMEOUT_S
    _GROUP_TIMEOUT_S = timeout_s


def explain(e: BaseException, what: str = "a collective") -> DistributedError:
    """The one message a survivor prints: who it is, what failed, the likely cause, the bound."""
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    return DistributedError(
        f"rank {rank()} of {world_size()}: lost contact with the other processes during {what} ({first}). "
        f"Another rank most likely died (see its log) or stopped responding; a silent peer is waited for "
        f"at most engine.dist_timeout_s={_GROUP_TIMEOUT_S} s."
    )


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        try:
            dist.barrier()
        except RuntimeError as e:
            raise (explain(e, "a barrier") if comm_failure(e) else e) from e


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of `x` over the processes (`x` itself in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        try:
            dist.all_reduce(x)
        except RuntimeError as e:
            raise (explain(e, "an all-reduce") if comm_failure(e) else e) from e
        x /= dist.get_world_size()
    return x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------------


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(
        str(path), local_files_only=True, trust_remote_code=trust_remote_code
    )
