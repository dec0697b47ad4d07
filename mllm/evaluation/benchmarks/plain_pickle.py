"""Pickles of plain data only: lists, dicts, tuples, strings, bytes, numbers, None, booleans.

refer's RefCOCO annotations ship their referring expressions as a pickle (`refs(unc).p`), and a pickle
is a program: loading one with the standard unpickler runs whatever callable it names. This reader
resolves no global at all (`find_class` refuses every one, and with it every way a pickle can call
code: GLOBAL, STACK_GLOBAL, INST, the extension registry, REDUCE and BUILD on such an object), nor
persistent ids. Plain containers and scalars need none, so refer's file loads; a file that asks for
anything else is refused, before any of it runs, with an error naming the file and what it asked for.

This is the one module of the project that imports `pickle` (tests/test_security.py holds it to this
reader).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from .core import BenchmarkError


class PlainPickleError(BenchmarkError):
    """A pickle refused: it needs a global (or a persistent id), or it is not a readable pickle."""


class _PlainUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves no global and no persistent id."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it asks for the global {module}.{name}, and no global is loaded")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it asks for a persistent object, and none is loaded")


def loads_plain(data: bytes, name: str = "<bytes>") -> Any:
    """The plain data in a pickle's bytes; `PlainPickleError` naming `name` when it needs more.

    Python 2 pickles (refer's were written by Python 2) decode their byte strings as UTF-8, with
    undecodable bytes replaced rather than failing the whole file."""
    try:
        return _PlainUnpickler(io.BytesIO(data), encoding="utf-8", errors="replace").load()
    except pickle.UnpicklingError as e:
        raise PlainPickleError(f"{name}: refused: {e}") from e
    except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as e:
        # what a truncated or corrupt pickle raises from the opcode reader
        raise PlainPickleError(f"{name}: not a readable pickle ({type(e).__name__}: {e})") from e


def load_plain(path: str | Path) -> Any:
    """`loads_plain` on a file's bytes; errors name the file."""
    path = Path(path)
    return loads_plain(path.read_bytes(), str(path))
