"""Answer extraction from free-form model output.

Rule-based and deterministic, so a score is reproducible offline. The evaluation issue extends this
module (numbers, boxes, yes/no hedges); the spine needs option letters and short answers.
"""

from __future__ import annotations

import re

_OPTION_RE = re.compile(r"\(([a-zA-Z])\)\s*([^()]*?)(?=\s*\([a-zA-Z]\)|$)")


def parse_options(options: str) -> dict[str, str]:
    """`(a) up (b) down` -> {"a": "up", "b": "down"} (letters lowercased)."""
    return {m.group(1).lower(): m.group(2).strip() for m in _OPTION_RE.finditer(options.strip())}


def normalise(text: str) -> str:
    """Lowercase, strip punctuation and articles' surrounding noise: compare short answers robustly."""
    text = text.strip().lower()
    text = re.sub(r"[\s]+", " ", text)
    return text.strip(" .,!?;:\"'`*")


def extract_option(response: str, options: dict[str, str]) -> str | None:
    """The option letter a response chose, or None when it cannot be told.

    Accepts "(b)", "b", "B.", "**B**", "Answer: B", "The answer is b", or the option's text ("down").
    A bare article ("a dog") is not read as option (a): a lone letter counts only when it stands alone
    or is dressed as an option (parentheses, a trailing period or colon, bold).
    """
    letters = "".join(options)
    r = response.strip()
    if not r:
        return None
    dressed = re.findall(rf"(?:\(([{letters}])\)|\*\*([{letters}])\*\*|\b([{letters}])[.:)](?!\w))", r, re.I)
    found = {next(g for g in m if g).lower() for m in dressed}
    if len(found) == 1:
        return found.pop()
    m = re.search(rf"answer\s*(?:is|:)\s*\(?([{letters}])\b", r, re.I)
    if m:
        return m.group(1).lower()
    if re.fullmatch(rf"([{letters}])", normalise(r), re.I):
        return normalise(r)
    norm = normalise(r)
    hits = [k for k, v in options.items() if v and re.search(rf"\b{re.escape(v.lower())}\b", norm)]
    if len(hits) == 1:
        return hits[0]
    return None
