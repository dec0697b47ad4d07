"""Sample files read lazily: an index of byte offsets at load, one record parsed on each access.

LLaVA's instruction sets are single JSON arrays of 0.5-1M records; parsing one whole keeps every
record as Python objects for the life of the run (in every data-loader worker), several times the
file's size. Here one pass over the file checks its syntax (errors keep the file, line and column)
and keeps only where each record starts and how long it is (12 bytes a record); `records[i]` reads
and parses that one slice with `os.pread`, which has no shared file position, so forked data-loader
workers can read concurrently.

Supported: a top-level JSON array (`.json`) and JSON Lines (`.jsonl`). Any other top-level value is
parsed eagerly so the error names what was found.
"""

from __future__ import annotations

import codecs
import json
import os
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

CHUNK = 1 << 20
_WS = " \t\n\r"


class DataError(ValueError):
    """A data file that cannot be read at all (syntax error, wrong top-level shape)."""


class _Reader:
    """UTF-8 text of a file in chunks, tracking the byte offset and line number of the buffer start."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "rb")
        self.dec = codecs.getincrementaldecoder("utf-8")()
        self.buf = ""
        self.byte0 = 0  # byte offset of buf[0]
        self.line0 = 1  # line number of buf[0]
        self.col0 = 0  # characters between the last newline before buf[0] and buf[0]
        self.read_bytes = 0
        self.eof = False
        self._mark = (0, 0)  # (index into buf, its byte offset in the file)

    def more(self, size: int = CHUNK) -> bool:
        if self.eof:
            return False
        data = self.f.read(size)
        try:
            self.buf += self.dec.decode(data, final=not data)
        except UnicodeDecodeError as e:
            raise DataError(f"{self.path}: not UTF-8 text (byte {self.read_bytes + e.start})") from e
        self.read_bytes += len(data)
        self.eof = not data
        return True

    def drop(self, n: int) -> None:
        """Forget buf[:n] (already indexed), keeping byte/line/column bookkeeping right."""
        gone = self.buf[:n]
        self.byte0 += len(gone.encode("utf-8"))
        nl = gone.count("\n")
        self.line0 += nl
        self.col0 = (len(gone) - gone.rfind("\n") - 1) if nl else self.col0 + len(gone)
        self.buf = self.buf[n:]
        self._mark = (0, self.byte0)

    def byte_at(self, pos: int) -> int:
        """File byte offset of buf[pos], for pos at or after the previous call's (linear overall)."""
        i, b = self._mark
        b += len(self.buf[i:pos].encode("utf-8"))
        self._mark = (pos, b)
        return b

    def where(self, pos: int) -> tuple[int, int]:
        """(line, column) of buf[pos], 1-based."""
        head = self.buf[:pos]
        nl = head.count("\n")
        col = (pos - head.rfind("\n")) if nl else self.col0 + pos + 1
        return self.line0 + nl, col

    def close(self) -> None:
        self.f.close()


def _skip_ws(r: _Reader, i: int) -> int:
    while True:
        while i < len(r.buf) and r.buf[i] in _WS:
            i += 1
        if i < len(r.buf) or not r.more():
            return i


def _syntax(path: Path, line: int, col: int, msg: str) -> DataError:
    return DataError(f"{path}:{line}: JSON syntax error: {msg} (column {col})")


def _index_array(path: Path) -> tuple[array, array] | None:
    """Offsets and lengths of the top-level array's elements; None when the file is not an array."""
    r = _Reader(path)
    dec = json.JSONDecoder()
    starts, lengths = array("q"), array("I")
    try:
        i = _skip_ws(r, 0)
        if i < len(r.buf) and r.buf[i] == "\ufeff":  # a UTF-8 byte-order mark
            i = _skip_ws(r, i + 1)
        if i >= len(r.buf) or r.buf[i] != "[":
            return None
        i = _skip_ws(r, i + 1)
        if i < len(r.buf) and r.buf[i] == "]":
            i += 1
        else:
            while True:
                if i > CHUNK:
                    r.drop(i)
                    i = 0
                while True:
                    try:
                        _, end = dec.raw_decode(r.buf, i)
                        # A value that ends exactly at the buffer's end may continue (a number, say).
                        if end < len(r.buf) or r.eof:
                            break
                    except json.JSONDecodeError as e:
                        if r.eof:
                            line, col = r.where(e.pos)
                            raise _syntax(path, line, col, e.msg) from e
                    r.more(max(CHUNK, len(r.buf)))  # grow geometrically: a large record costs O(n log n)
                start = r.byte_at(i)
                starts.append(start)
                lengths.append(r.byte_at(end) - start)
                i = _skip_ws(r, end)
                if i >= len(r.buf):
                    line, col = r.where(i)
                    raise _syntax(path, line, col, "Expecting ',' delimiter or ']' (the array is not closed)")
                if r.buf[i] == "]":
                    i += 1
                    break
                if r.buf[i] != ",":
                    line, col = r.where(i)
                    raise _syntax(path, line, col, "Expecting ',' delimiter")
                i = _skip_ws(r, i + 1)
        i = _skip_ws(r, i)
        if i < len(r.buf):
            line, col = r.where(i)
            raise _syntax(path, line, col, "Extra data")
        return starts, lengths
    finally:
        r.close()


def _index_lines(path: Path) -> tuple[array, array]:
    """Offsets and lengths of the non-blank lines of a JSON Lines file, each checked to parse."""
    starts, lengths = array("q"), array("I")
    pos = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                try:
                    json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: not UTF-8 text (byte {pos + e.start})") from e
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: JSON syntax error: {e.msg} (column {e.colno})") from e
                starts.append(pos)
                lengths.append(len(raw))
            pos += len(raw)
    return starts, lengths


class LazyRecords(Sequence):
    """A read-only sequence of the records of one file; each access parses that record afresh."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._eager: list | None = None
        self._fd: int | None = None
        self._pid = -1
        try:
            index = _index_lines(self.path) if self.path.suffix == ".jsonl" else _index_array(self.path)
        except OSError as e:
            raise DataError(f"{self.path}: cannot read: {e}") from e
        if index is None:
            self._eager = _read_eager(self.path)
            index = (array("q"), array("I"))
        self._starts, self._lengths = index

    def __len__(self) -> int:
        return len(self._eager) if self._eager is not None else len(self._starts)

    def _read(self, i: int) -> Any:
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own descriptor
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        raw = os.pread(self._fd, self._lengths[i], self._starts[i])
        return json.loads(raw.decode("utf-8"))

    @overload
    def __getitem__(self, i: int) -> Any: ...

    @overload
    def __getitem__(self, i: slice) -> list[Any]: ...

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self._eager is not None:
            return self._eager[i]
        n = len(self._starts)
        if not -n <= i < n:
            raise IndexError(f"{self.path}: record {i} out of range ({n} records)")
        return self._read(i % n)

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self) -> dict[str, Any]:  # picklable for spawn-started workers: no descriptor
        return dict(self.__dict__, _fd=None, _pid=-1)

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass

    def index_bytes(self) -> int:
        """Memory the index itself holds (what a sample costs at rest)."""
        return self._starts.itemsize * len(self._starts) + self._lengths.itemsize * len(self._lengths)


def _read_eager(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from e
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: JSON syntax error: {e.msg} (column {e.colno})") from e
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a list of samples, got {type(records).__name__}")
    return records


def read_records(path: str | Path) -> Sequence[Any]:
    """A JSON list (LLaVA) or JSONL file of sample objects, lazily; syntax errors name file, line, column."""
    return LazyRecords(path)
