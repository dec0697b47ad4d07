"""One small registry: name -> entry, used by every registry in `encoders` and `mllm`.

    TOWERS: Registry[type[Tower]] = Registry("tower type")

    @TOWERS.register("clip")          # or TOWERS.register("clip", ClipTower)
    class ClipTower(Tower): ...

    TOWERS["clip"]                    # the entry; an unknown name raises UnknownName listing the known ones

A registry refuses a second entry under a name it already holds (`DuplicateName`, naming the file:line
and module of both registrations), so two modules cannot silently shadow each other; `replace=True`
says a replacement is meant. A *pattern* entry stands for a family of names (`mlp{N}x_gelu`): a regex and
a function from its match to the entry, tried when no fixed name matches.

A registry is a read-only `Mapping` over its fixed names (`in` also accepts a name a pattern matches).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

__all__ = ["DuplicateName", "Registry", "UnknownName"]

T = TypeVar("T")


class DuplicateName(ValueError):
    """A name registered twice; the message names both places."""


class UnknownName(ValueError, KeyError):
    """A lookup of a name nobody registered; the message lists the known names. A `KeyError` too, so
    `Mapping.get` and `except KeyError` keep working."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class _Pattern(Generic[T]):
    regex: re.Pattern[str]
    make: Callable[[re.Match[str]], T]
    where: str


def _place(stacklevel: int) -> str:
    """`file:line (module)` of the frame `stacklevel` levels above the function that calls this one."""
    frame = sys._getframe(stacklevel + 1)
    return f"{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_globals.get('__name__', '?')})"


class Registry(Mapping[str, T]):
    """Named entries of one kind (`what` names the kind in error messages: "tower type", "benchmark")."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}
        self._where: dict[str, str] = {}
        self._patterns: dict[str, _Pattern[T]] = {}  # display form ("mlp{N}x_gelu") -> pattern

    # ------------------------------------------------------------------------------------- registering
    @overload
    def register(self, name: str, *, replace: bool = ..., stacklevel: int = ...) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, entry: T, *, replace: bool = ..., stacklevel: int = ...) -> T: ...

    def register(self, name: str, entry: Any = ..., *, replace: bool = False, stacklevel: int = 1) -> Any:
        """Add `entry` under `name` and return it; without `entry`, a decorator that does so.

        `stacklevel` says whose place is recorded: 1 = the caller of `register` (or of the decorator);
        a helper that wraps `register` passes 2 so the place is its own caller's."""
        if entry is ...:

            def decorator(obj: T) -> T:
                self._add(name, obj, replace, _place(stacklevel))
                return obj

            return decorator
        self._add(name, entry, replace, _place(stacklevel))
        return entry

    def register_pattern(
        self, pattern: str, display: str, make: Callable[[re.Match[str]], T], *, stacklevel: int = 1
    ) -> Callable[[re.Match[str]], T]:
        """Add a family of names: every name that fully matches the regex `pattern` is `make(match)`.
        `display` is how the family is shown among the known names (and its key for duplicates)."""
        where = _place(stacklevel)
        if display in self._patterns:
            raise DuplicateName(
                f"{self.what} family {display!r} is already registered at "
                f"{self._patterns[display].where}; registered again at {where}"
            )
        self._patterns[display] = _Pattern(re.compile(pattern), make, where)
        return make

    def check_free(self, name: str, *, stacklevel: int = 1) -> None:
        """Raise `DuplicateName` if `name` is taken (for a caller that registers several entries at once
        and wants all or none)."""
        if name in self._entries:
            raise DuplicateName(
                f"{self.what} {name!r} is already registered at {self._where[name]}; "
                f"registered again at {_place(stacklevel)}"
            )

    def _add(self, name: str, entry: T, replace: bool, where: str) -> None:
        if name in self._entries and not replace:
            raise DuplicateName(
                f"{self.what} {name!r} is already registered at {self._where[name]}; "
                f"registered again at {where}"
            )
        self._entries[name] = entry
        self._where[name] = where

    def unregister(self, name: str) -> T:
        """Remove and return the entry `name` (tests that register a throwaway entry)."""
        entry = self[name]
        del self._entries[name], self._where[name]
        return entry

    # ---------------------------------------------------------------------------------------- looking up
    def __getitem__(self, name: str) -> T:
        if name in self._entries:
            return self._entries[name]
        for pat in self._patterns.values():
            match = pat.regex.fullmatch(name)
            if match:
                return pat.make(match)
        raise UnknownName(f"unknown {self.what} {name!r}; known: {', '.join(self.known())}")

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return name in self._entries or any(p.regex.fullmatch(name) for p in self._patterns.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def known(self) -> list[str]:
        """Every name and name family a lookup accepts: the fixed names sorted, then the patterns sorted."""
        return sorted(self._entries) + sorted(self._patterns)

    def where(self, name: str) -> str:
        """`file:line (module)` where `name` (or the family `name` displays as) was registered."""
        if name in self._where:
            return self._where[name]
        if name in self._patterns:
            return self._patterns[name].where
        raise UnknownName(f"unknown {self.what} {name!r}; known: {', '.join(self.known())}")

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {self.known()})"
