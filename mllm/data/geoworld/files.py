"""Deterministic writers for the JSON, JSONL and CSV files of a world.

UTF-8 without ASCII escaping (the degree sign stays readable), fixed key order, LF line endings:
the same objects always give the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: Iterable[Any]) -> int:
    """Write one compact JSON object per line; returns the number of lines."""
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)


def read_jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_csv(path: Path, header: list[str], rows: Iterable[list[Any]]) -> int:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    count = 0
    for r in rows:
        w.writerow(r)
        count += 1
    path.write_text(buf.getvalue(), encoding="utf-8")
    return count
