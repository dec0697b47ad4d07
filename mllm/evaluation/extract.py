"""Answer extraction from free-form model output: option letters, yes/no, numbers and boxes.

Every benchmark here is scored offline by rules, never by an LLM judge, so a score is reproducible
from the predictions file alone. The rules are written against what models really print rather than
what the prompt asked for: "(b)", "**B**", "The answer is b", the option's text instead of its
letter, "No, there is not", "30°", "2\\sqrt{3}", "\\boxed{12}", "[0.12, 0.30, 0.55, 0.81]".

Conventions shared by every extractor:

- They never raise on any text (empty, unicode, megabytes): a model's output is data, and one odd
  answer must cost one item, not the whole evaluation run. Invalid *arguments* from the caller (an
  unknown box format) do raise, since that is a bug in the caller, not in the model.
- They return None when the answer cannot be told, instead of guessing; callers count those as
  "unparsed" so a format problem is visible in the metrics rather than silently scored as wrong.
- All regular expressions are linear-time on the inputs they see (no nested quantifiers over the
  same characters), so a pathological output cannot stall an evaluation.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Mapping, Sequence

__all__ = [
    "BOX_FORMATS",
    "extract_answer_text",
    "extract_box",
    "extract_box_official",
    "extract_number",
    "extract_option",
    "extract_yes_no",
    "iou",
    "iou_official",
    "is_number_answer",
    "normalise",
    "numbers_match",
    "parse_choices",
    "parse_options",
    "pope_yes_no",
    "text_answer_matches",
]

# --------------------------------------------------------------------------------------------------
# Options and short answers
# --------------------------------------------------------------------------------------------------


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    found = None
    for found in pattern.finditer(text):  # noqa: B007 - the loop is the search
        pass
    return found


_OPTION_RE = re.compile(r"\(([a-zA-Z])\)\s*([^()]*?)(?=\s*\([a-zA-Z]\)|$)")


def parse_options(options: str) -> dict[str, str]:
    """`(a) up (b) down` -> {"a": "up", "b": "down"} (letters lowercased).

    MMVP and GeoWorld write options in this parenthesised form; letters are lowercased because the
    official answers are written "(a)"/"(b)" and scoring compares against those.
    """
    return {m.group(1).lower(): m.group(2).strip() for m in _OPTION_RE.finditer(options.strip())}


_CHOICES_HEAD_RE = re.compile(r"choices?\s*:", re.I)
_CHOICE_MARK_RE = re.compile(r"(?:(?<=\s)|^)\(?([A-H])\s*[:.)：]\s*")


def parse_choices(text: str) -> dict[str, str]:
    """The lettered choices of a MathVerse-style question, {"A": "60°", "B": "35°", ...}, or {}.

    MathVerse puts the choices inside the question text after "Choices:", one per line ("A:60°") or
    inline ("A. 1 B. 2"); scoring needs the option texts so that an answer given as a value ("50°")
    can be mapped back to its letter. Letters must run A, B, C, ... in order, which keeps a capital
    inside an option ("angle B") from being taken for a new option.
    """
    head = _last_match(_CHOICES_HEAD_RE, text)
    if head is None:
        return {}
    body = text[head.end() :]
    out: dict[str, str] = {}
    marks = []
    want = "A"
    for m in _CHOICE_MARK_RE.finditer(body):
        if m.group(1) == want:
            marks.append(m)
            want = chr(ord(want) + 1)
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(body)
        out[m.group(1)] = body[m.end() : end].strip()
    return out


def normalise(text: str) -> str:
    """Lowercase, collapse whitespace and strip surrounding punctuation: compare short answers robustly."""
    text = text.strip().lower()
    text = re.sub(r"[\s]+", " ", text)
    return text.strip(" .,!?;:\"'`*")


# Words after which a capital letter is a geometric label (angle C, point B), never an option.
_LABEL_BEFORE_RE = re.compile(
    r"(?:angle|angles|point|points|vertex|vertices|side|sides|line|segment|triangle|circle|"
    r"quadrilateral|polygon|arc|chord|edge|∠|△|⊙)\s*$",
    re.I,
)
_CUE = (
    r"(?:(?:answer|option|choice|letter)(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?"
    r"|choose|chose|select|selected|pick|picked|go\s+with|\\boxed)"
)
_NEGATOR_BEFORE_RE = re.compile(r"(?:\bnot|n't|\bno|\bnever|\bneither|\bnor)\s+(?:\w+\s+)?$", re.I)
_START_CONNECTIVES = {"because", "since", "is", "as", "would", "should", "seems", "appears", "looks", "fits"}


def _letter_alt(keys: Sequence[str]) -> str:
    return "|".join(re.escape(k) for k in sorted(keys, key=len, reverse=True))


def _article_like(text: str, end: int, letter: str) -> bool:
    """True when the single letter ending at `end` reads as an English word ("a dog", "A dog", "I think")."""
    if letter.lower() not in ("a", "i"):
        return False
    rest = text[end : end + 40]
    follow = re.match(r"\s+([A-Za-z]+)", rest)
    if not follow:
        return False
    if letter.islower():
        return True
    return follow.group(1)[0].islower()


def _is_label(text: str, start: int) -> bool:
    return bool(_LABEL_BEFORE_RE.search(text[max(0, start - 20) : start]))


def extract_option(response: str, options: Mapping[str, str]) -> str | None:
    """The option key a response chose, or None when it cannot be told (or two are asserted).

    Accepts the letter in any dress — "(b)", "B.", "b)", "**B**", "The answer is b", "Answer: B",
    "Option B", "\\boxed{B}", a bare "B" — or the option's own text ("Closed"), or for numeric options
    the same value in another unit dress ("50 degrees" for "50°"). Returns the key as spelled in
    `options` (so lower-case for `parse_options`, upper-case for `parse_choices`), whatever case the
    model used.

    Traps handled because public evaluators fall into them: the article "a" in "There is a dog on the
    left, so B" or "a red circle" is not option A; a capital that labels geometry ("angle C") is not
    option C; a response asserting two different letters is ambiguous and returns None rather than
    whichever letter happened to come first.
    """
    if not options or not isinstance(response, str):
        return None
    keys = {str(k).lower(): str(k) for k in options if str(k)}
    if not keys:
        return None
    r = response.strip()
    if not r:
        return None
    L = _letter_alt(list(keys))
    # 1. The whole response is a (possibly dressed) letter.
    whole = re.fullmatch(
        rf"(?:(?:the\s+)?(?:answer|option|choice)(?:\s+is)?(?:\s*[:\-])?\s*)?"
        rf"[\(\[]?(?:\*\*)?({L})(?:\*\*)?[\)\]]?[.:!]?",
        r,
        re.I,
    )
    if whole:
        return keys[whole.group(1).lower()]

    # 2. Letters after an answer cue ("The answer is B", "Answer: (b)", "Option B", "\boxed{B}").
    #    After "answer"/"choose" a lower-case "a" + word is an article ("the answer is a red circle");
    #    after "option"/"choice"/"letter" it is always a letter ("option a is wrong").
    cue_re = re.compile(
        rf"(?P<cue>{_CUE})(?:[ \t]*[:=\-–])?[ \t]*(?:(?:option|choice|letter)[ \t]+)?"
        rf"(?:\{{)?[\(\[]?(?:\*\*)?({L})(?:\*\*)?[\)\]]?(?![\w'’])",
        re.I,
    )
    cued: set[str] = set()
    for m in cue_re.finditer(r):
        strict = m.group("cue").lower().startswith(("option", "choice", "letter"))
        if strict or not _article_like(r, m.end(2), m.group(2)):
            cued.add(m.group(2).lower())
    if len(cued) == 1:
        return keys[cued.pop()]
    if len(cued) > 1:
        return None

    # 3. Dressed letters anywhere, a letter closing a clause ("..., so B"), a letter opening the answer.
    found: set[str] = set()
    dressed = re.compile(
        rf"\(({L})\)|\*\*[ \t]*\(?({L})\)?[ \t]*\*\*|(?<![\w'’\-\\])({L})[.):](?![\w'’])", re.I
    )
    for m in dressed.finditer(r):
        idx = next(i for i in (1, 2, 3) if m.group(i))
        if m.group(3) and _is_label(r, m.start(3)):
            continue
        found.add(m.group(idx).lower())
    bare = re.compile(rf"(?<![\w'’\-\\])({L})(?=[ \t]*(?:[,;!?\]\n]|\.(?!\w)|$))", re.I)
    for m in bare.finditer(r):
        if not _is_label(r, m.start(1)):
            found.add(m.group(1).lower())
    pair = re.compile(rf"(?<![\w'’\-\\])({L})[ \t]+(?:and|or|&)[ \t]+({L})(?![\w'’])", re.I)
    for m in pair.finditer(r):  # "A and B", "a or b": both asserted, whatever their case
        found.update((m.group(1).lower(), m.group(2).lower()))
    start = re.match(rf"[\(\[]?({L})[\)\]]?[ \t]+([A-Za-z]+)", r, re.I)
    if start and (start.group(1).lower() not in ("a", "i") or start.group(2).lower() in _START_CONNECTIVES):
        found.add(start.group(1).lower())
    if len(found) == 1:
        return keys[found.pop()]
    if len(found) > 1:
        return None

    # 4. The option's text ("Closed" -> the letter whose option is "Closed").
    hit = _match_option_text(r, {k: str(v) for k, v in options.items()})
    if hit is not None:
        return keys.get(str(hit).lower())
    # 5. Numeric options answered with the value in another dress ("50 degrees" for "50°").
    values = {k: extract_number(str(v)) for k, v in options.items()}
    if values and all(v is not None for v in values.values()):
        got = extract_number(r)
        if got is not None:
            same = [k for k, v in values.items() if v is not None and numbers_match(got, v, rel_tol=1e-6)]
            if len(same) == 1:
                return keys.get(str(same[0]).lower())
    return None


def _light(text: str) -> str:
    """Lowercase, curly quotes straightened, whitespace collapsed: every character that can tell two
    options apart ("Happy Easter" / "Happy Easter!") is kept."""
    t = text.replace("\u201c", '"').replace("\u201d", '"').replace("\u2018", "'").replace("\u2019", "'")
    return re.sub(r"\s+", " ", t.strip().lower())


def _match_option_text(response: str, options: Mapping[str, str]) -> str | None:
    """The single option whose text the response names, ignoring texts inside longer option texts
    ("red" inside "dark red") and texts negated ("not open"); None when zero or several remain.

    Exact text first (case and spacing aside, surrounding quotes off the option), so options that
    differ only by punctuation stay apart; only when no option's exact text is named does the
    normalised comparison (punctuation stripped) get a say, and options that normalise alike are
    then a tie, never a pick."""
    exact = {k: _light(str(v)).strip("\"'`") for k, v in options.items()}
    got = _option_text_hits(_light(response), exact)
    if got is not _NO_HIT:
        return got
    got = _option_text_hits(normalise(response), {k: normalise(str(v)) for k, v in options.items()})
    return None if got is _NO_HIT else got


_NO_HIT = object()  # no option's text named at all (as opposed to a tie, which is None)


def _option_text_hits(text: str, texts: Mapping[str, str]) -> object:
    """The option named in `text` (already normalised like `texts`), None for a tie, `_NO_HIT` for none."""
    texts = {k: v for k, v in texts.items() if v}
    starts: dict[str, list[int]] = {
        k: [m.start() for m in re.finditer(rf"(?<!\w){re.escape(v)}(?!\w)", text)] for k, v in texts.items()
    }

    def inside_longer(k: str, start: int) -> bool:
        # Only an option whose text contains this one's can swallow a match of it; its matches all
        # have one length and do not overlap, so the last one starting at or before ours decides.
        end = start + len(texts[k])
        for j, v in texts.items():
            if j != k and len(v) > len(texts[k]) and texts[k] in v and starts[j]:
                i = bisect.bisect_right(starts[j], start) - 1
                if i >= 0 and starts[j][i] + len(v) >= end:
                    return True
        return False

    positive: set[str] = set()
    negated: set[str] = set()
    for k, found in starts.items():
        for start in found:
            if inside_longer(k, start):
                continue
            if _NEGATOR_BEFORE_RE.search(text[max(0, start - 30) : start]):
                negated.add(k)
            else:
                positive.add(k)
                break
    if len(positive) == 1:
        return positive.pop()
    if positive:
        return None
    # "not open" with exactly two options says the other one.
    if len(negated) == 1 and len(texts) == 2 and len(set(texts.values())) == 2:
        return next(k for k in texts if k not in negated)
    return None if negated else _NO_HIT


# --------------------------------------------------------------------------------------------------
# Yes / no
# --------------------------------------------------------------------------------------------------


def pope_yes_no(text: str, official: bool = False) -> str | None:
    """POPE's official rule, reproduced so our numbers compare with published ones.

    Keep the first sentence (up to the first "."), drop commas, split on spaces; "No", "no" or "not"
    among the words -> "no", anything else -> "yes". Its quirks are kept on purpose ("NO" and
    "No!" read as yes; the paper's numbers include them). The one change, unless `official`: an
    empty answer is None (unparsed) instead of "yes", so a model that printed nothing is reported,
    not rewarded. `official=True` is the public scorer exactly (POPE's evaluate.py, LLaVA's
    eval_pope.py): an empty answer is "yes".
    """
    if not isinstance(text, str):
        return None
    if not text.strip() and not official:
        return None
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    if "No" in words or "not" in words or "no" in words:
        return "no"
    return "yes"


_YES_WORDS = {"yes", "yeah", "yep", "yup", "yea", "affirmative"}
_NO_WORDS = {"no", "nope", "nah", "negative"}
_NEGATIONS = {
    "not",
    "none",
    "nothing",
    "never",
    "neither",
    "nor",
    "nobody",
    "nowhere",
    "cannot",
    "absent",
    "without",
}
_UNSURE = re.compile(
    r"not\s+(?:entirely\s+|completely\s+|quite\s+)?(?:sure|certain|clear)|unsure|uncertain|unclear|"
    r"can(?:no|')t\s+(?:tell|determine|say|be\s+sure)|can\s+not\s+(?:tell|determine|say)|"
    r"(?:hard|difficult|impossible)\s+to\s+(?:tell|say|determine)|unable\s+to|\bmaybe\b|\bperhaps\b|"
    r"\bpossibly\b|\bambiguous\b|\bunknown\b|(?:do\s+not|don't)\s+know",
)
_HEDGE_YES = re.compile(r"\b(?:i\s+(?:think|believe|guess|suppose)\s+so|it\s+seems\s+so|likely\s+so)\b")
_HEDGE_NO = re.compile(
    r"\b(?:i\s+(?:don't|do\s+not)\s+(?:think|believe)\s+so|i\s+(?:think|believe|guess)\s+not|"
    r"(?:probably|likely)\s+not|unlikely|doubt\s+it)\b"
)
_AFFIRM = re.compile(
    r"\b(?:there\s+(?:is|are)|i\s+(?:can\s+)?see|it\s+(?:is|does)|correct|true|indeed|certainly|definitely|"
    r"of\s+course|sure|present|visible|contains?|shows?)\b"
)


def extract_yes_no(text: str) -> str | None:
    """A stricter yes/no reader than POPE's rule, for benchmarks where a non-answer must not be "yes".

    Reads the first sentence that takes a position: a leading "Yes"/"No" decides ("No, there is
    not" -> no); hedges count for the side they lean to ("I don't think so", "unlikely" -> no;
    "probably yes", "I think so" -> yes); negation without a yes ("There is no dog") -> no; a plain
    affirmative statement ("There is a dog") -> yes; uncertainty ("I'm not sure", "maybe") or
    contradictions ("yes and no") -> None.
    """
    if not isinstance(text, str):
        return None
    t = text.replace("’", "'").replace("‘", "'").lower().strip()
    if not t:
        return None
    for sentence in re.split(r"[.!?;\n]+", t):
        words = re.findall(r"[a-z']+", sentence)
        if not words:
            continue
        clean = [w.strip("'") for w in words]
        has_yes = any(w in _YES_WORDS for w in clean)
        has_no = any(w in _NO_WORDS for w in clean)
        if clean[0] in _YES_WORDS and not has_no:
            return "yes"
        if clean[0] in _NO_WORDS and not has_yes:
            return "no"
        if _UNSURE.search(sentence):
            if has_yes != has_no:
                return "yes" if has_yes else "no"
            return None
        if has_yes and has_no:
            return None
        if _HEDGE_NO.search(sentence):
            return "no"
        if _HEDGE_YES.search(sentence) or has_yes:
            return "yes"
        if has_no or any(w in _NEGATIONS or w.endswith("n't") for w in clean):
            return "no"
        if _AFFIRM.search(sentence):
            return "yes"
        return None
    return None


# --------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------

_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?"


def _atom(p: str) -> str:
    """One numeric atom — `c√r`, `c√(r)`, `n`, each optionally times π — with group names prefixed by `p`."""
    return (
        rf"(?:(?P<{p}coef>{_NUM})[ \t]*)?√[ \t]*(?:\((?P<{p}rp>{_NUM})\)|(?P<{p}rb>{_NUM}))(?P<{p}pi1>π)?"
        rf"|(?P<{p}num>{_NUM})[ \t]*(?P<{p}pi2>π)?|(?P<{p}pi3>π)"
    )


_TERM_RE = re.compile(rf"(?<![\w.])(?P<sign>-)?(?:{_atom('n_')})(?:[ \t]*/[ \t]*(?:{_atom('d_')}))?")
_ANSWER_CUE_RE = re.compile(r"(?:final\s+answer|answer|result)\s*(?:is|would\s+be|should\s+be|:|=)", re.I)


_UNIT_WRAP_RE = re.compile(r"\\(?:mathrm|text|textrm|mathit|mathbf|operatorname|rm)\s*\{([^{}]*)\}")
# An exponent on a unit ("cm^3", "cm^{2}", "cm²"), not on a number or π: it is part of the unit's name.
_UNIT_POWER_RE = re.compile(r"(?<=[A-Za-z])[ \t]*(?:\^[ \t]*(?:\{[ \t]*-?\d+[ \t]*\}|-?\d+)|[⁰¹²³⁴⁵⁶⁷⁸⁹⁻]+)")
_SIMPLE_ATOM_RE = re.compile(r"-?(?:[\d.,]*√?\(?[\d.,]+\)?π?|π)")


def _group(expr: str) -> str:
    """`expr` as one side of a fraction: bare when it is one atom ("9√(3)", "3π"), else in parentheses."""
    expr = expr.strip()
    return expr if _SIMPLE_ATOM_RE.fullmatch(expr) else f"({expr})"


def _latex_to_plain(text: str) -> str:
    """Rewrite the LaTeX that models print around numbers into the plain forms `_TERM_RE` reads.

    Units lose their dress and their exponent ("720 \\mathrm{cm}^3", "113.1 \\mathrm{~cm}^{2}",
    "2500π cm²" -> "720 cm", "113.1 cm", "2500π cm"): the exponent of a unit is not a second number."""
    t = text.replace("−", "-").replace("–", "-").replace("⁄", "/").replace("∕", "/").replace("$", "")
    t = (
        t.replace("\\left", "")
        .replace("\\right", "")
        .replace("\\!", "")
        .replace("\\,", "")
        .replace("\\;", " ")
        .replace("\\quad", " ")
        .replace("{,}", "")
    )
    t = t.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\pi", "π").replace("\\%", "%")
    t = re.sub(r"\^\s*(?:\{\s*)?\\circ(?:\s*\})?|\\circ|\\degree", "°", t)
    t = _UNIT_WRAP_RE.sub(lambda m: m.group(1), t).replace("~", " ")
    t = _UNIT_POWER_RE.sub("", t)
    for _ in range(3):  # nested \frac{\sqrt{3}}{2}: a few passes, each linear
        t = re.sub(r"\\sqrt\s*\{([^{}]*)\}", lambda m: f"√({m.group(1).strip()})", t)
        t = re.sub(r"\\sqrt\s*(\d)", r"√\1", t)
        t = re.sub(
            r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}",
            lambda m: f"{_group(m.group(1))}/{_group(m.group(2))}",
            t,
        )
    t = re.sub(r"\((√?\(?[\d.,]+\)?π?)\)", r"\1", t)  # "√(3)" -> "√3", "(2)" -> "2" after the passes
    return t


def _term_value(m: re.Match[str], p: str) -> tuple[float, int | None] | None:
    """The value of one side of a term and the decimals of its literal (None: not a plain decimal)."""
    g = m.groupdict()

    def num(s: str) -> float:
        return float(s.replace(",", ""))

    if g[p + "rp"] or g[p + "rb"]:
        coef = num(g[p + "coef"]) if g[p + "coef"] else 1.0
        value = coef * math.sqrt(num(g[p + "rp"] or g[p + "rb"]))
        if g[p + "pi1"]:
            value *= math.pi
        return value, None
    if g[p + "num"]:
        lit = g[p + "num"]
        value = num(lit)
        if g[p + "pi2"]:
            return value * math.pi, None
        plain = re.fullmatch(r"[\d,]*\.(\d+)", lit)
        return value, (len(plain.group(1)) if plain else (0 if re.fullmatch(r"[\d,]+", lit) else None))
    if g[p + "pi3"]:
        return math.pi, None
    return None


def _match_value(m: re.Match[str]) -> tuple[float, int | None] | None:
    try:
        top = _term_value(m, "n_")
        if top is None:
            return None
        value, decimals = top
        if m.group("d_num") or m.group("d_rp") or m.group("d_rb") or m.group("d_pi3"):
            bottom = _term_value(m, "d_")
            if bottom is None or bottom[0] == 0:
                return None
            value, decimals = value / bottom[0], None
        if m.group("sign"):
            value = -value
        if not math.isfinite(value):
            return None
        return value, decimals
    except (ValueError, OverflowError):
        return None


def _boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}`, braces balanced (linear scan)."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0 or text[start + 6 : brace].strip():
        return None
    depth = 0
    for i in range(brace, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i]
    return text[brace + 1 :]


def _answer_segment(text: str, after_equals: bool = True) -> str | None:
    """The text after the last answer cue, to the end of its line or sentence; after its last "=" when
    the model wrote the answer as an equation ("the answer is 5 + 7 = 12")."""
    cue = _last_match(_ANSWER_CUE_RE, text)
    if cue is None:
        return None
    seg = text[cue.end() :]
    end = re.search(r"\n|\.(?:\s|$)", seg)
    seg = seg[: end.start()] if end else seg
    if after_equals and "=" in seg:
        seg = seg[seg.rfind("=") + 1 :]
    return seg


def extract_answer_text(text: str) -> str | None:
    """The short answer inside a response, for answers compared as strings: the last `\\boxed{...}`,
    else what follows the last "answer is"/"Answer:" on its line, else the whole response, stripped
    of surrounding "$", spaces and punctuation; None when nothing is left."""
    if not isinstance(text, str):
        return None
    seg = _boxed(text)
    if seg is None:
        seg = _answer_segment(text, after_equals=False)
    if seg is None:
        seg = text
    seg = seg.strip().strip("$").strip(" .,;:!?\"'`*")
    return seg or None


def _find_number(text: str) -> tuple[float, int | None] | None:
    if not isinstance(text, str) or not text:
        return None
    plain = _latex_to_plain(text)
    for segment in (_boxed(plain), _answer_segment(plain)):
        if segment is not None:
            for m in _TERM_RE.finditer(segment):
                got = _match_value(m)
                if got is not None:
                    return got
    last = None
    for m in _TERM_RE.finditer(plain):
        got = _match_value(m)
        if got is not None:
            last = got
    return last


def extract_number(text: str) -> float | None:
    """The numeric answer of a response, or None.

    Looks in `\\boxed{...}` first, then after the last "answer is"/"Answer:", else takes the last
    number in the text (reasoning ends with its result). Reads units and dress around the value
    ("30 degrees", "12 cm", "30°", "50%", "$12$"), fractions ("3/4", "\\frac{3}{4}"), roots ("2√3",
    "\\sqrt{3}", "\\frac{\\sqrt{3}}{2}"), π, thousands separators ("1,234"), signs ("-5", "−5") and
    exponents ("1e-07", which is how Python prints small floats).
    """
    got = _find_number(text)
    return None if got is None else got[0]


# What may stand around the one number of a numeric answer: unit words ("cm", "square units", "m/s"),
# degree/percent signs, a label before "=" ("Area =", "x ="), "≈" and spacing. Anything else (an
# operator, a second number, a bracket) makes the answer an expression, compared as text.
_DRESS_CHARS = frozenset(" \t\n.:;~°%/·≈'\"\\")


def _is_dress(text: str) -> bool:
    rest = re.sub(r"[^\W\d_]+", "", text)  # unit words (any letters) go; what remains must be spacing/signs
    return all(c in _DRESS_CHARS for c in rest)


def is_number_answer(text: str) -> bool:
    """Whether a reference answer is a single number in some dress ("12", "30°", "2\\sqrt{3}", "12 cm",
    "720 \\mathrm{cm}^3", "Area $=113.1 \\mathrm{~cm}^{2}$", "\\frac{9\\sqrt{3}}{2}").

    Decides how a free-form answer is compared: by value with rounding tolerance when it is one
    number with nothing but units, signs or a label around it, as a normalised string otherwise
    (intervals, tuples, expressions such as "y = 2x + 1" or "x^2+1").
    """
    if not isinstance(text, str) or not text.strip():
        return False
    plain = _latex_to_plain(text)
    terms = [m for m in _TERM_RE.finditer(plain) if _match_value(m) is not None]
    if len(terms) != 1:
        return False
    before, after = plain[: terms[0].start()], plain[terms[0].end() :]
    if "=" in before:  # a label: "Area =", "x ="
        before = before[before.rfind("=") + 1 :]
    return _is_dress(before) and _is_dress(after)


def _norm_expr(text: str) -> str:
    """Lower-case, no spaces, "$", "\\left"/"\\right" or "\\text{}" wrappers: "( 1, 3 ]" == "(1,3]"."""
    t = text.lower().replace("\\left", "").replace("\\right", "").replace("$", "")
    t = re.sub(r"\\text\{([^{}]*)\}", r"\1", t)
    return re.sub(r"\s+", "", t).strip(".")


def _tight(text: str) -> str:
    """Like `_norm_expr` but keeping the spaces between words, so word boundaries survive: lower-case,
    "$"/"\\left"/"\\right"/"\\text{}" off, no spaces around operators and punctuation."""
    t = text.lower().replace("\\left", "").replace("\\right", "").replace("$", "")
    t = re.sub(r"\\text\{([^{}]*)\}", r"\1", t)
    t = re.sub(r"\s+", " ", t).strip()
    return re.sub(r" ?([^\w ]) ?", r"\1", t)


def _last_statement(text: str) -> str:
    """The last non-empty line, and in it the last sentence: where a short answer states its result."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    line = lines[-1] if lines else text
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", line) if s.strip()]
    return sentences[-1] if sentences else line


# `_NEGATOR_BEFORE_RE` for `_tight` text, where "not (1, 3]" has become "not(1,3]".
_NEGATOR_TIGHT_RE = re.compile(r"(?:\b(?:not|no|never|neither|nor)\b|n't)\s*(?:\w+\s+)?$", re.I)


def text_answer_matches(response: str, truth: str) -> bool:
    """Whether a response gives a non-numeric reference answer ("even", "y=2x+1", "(1, 3]").

    The short answer (`extract_answer_text`) equal to the truth once spacing and LaTeX wrappers are
    ignored, or the truth named as a whole phrase in its last statement and not negated there: "The
    function is even." gives "even", "It is not even, it is odd." does not; "y = 2x + 10" does not
    give "y=2x+1". This stands in for the official MathVerse route (GPT-4 extracts the answer, then
    an exact match), which would read the same answers from such sentences.
    """
    if not isinstance(response, str) or not isinstance(truth, str) or not truth.strip():
        return False
    got = extract_answer_text(response)
    if got is None:
        return False
    if _norm_expr(got) == _norm_expr(truth):
        return True
    phrase, statement = _tight(truth).strip(" .,;:!?"), _tight(_last_statement(got))
    if not phrase:
        return False
    # word boundaries where the phrase starts or ends with a word character ("even" not in "uneven")
    head = r"(?<![\w.])" if re.match(r"[\w.]", phrase) else ""
    tail = r"(?![\w.])" if re.match(r"[\w.]", phrase[-1]) else ""
    for m in re.finditer(head + re.escape(phrase) + tail, statement):
        if not _NEGATOR_TIGHT_RE.search(statement[max(0, m.start() - 30) : m.start()]):
            return True
    return False


def _as_number(x: float | int | str | None) -> tuple[float, int | None] | None:
    if x is None or isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return (float(x), None) if math.isfinite(float(x)) else None
    return _find_number(x)


def numbers_match(
    pred: float | int | str | None, truth: float | int | str | None, rel_tol: float = 1e-3
) -> bool:
    """Whether two answers are the same number, allowing for rounding.

    Equal within `rel_tol` (relative; absolute 1e-9 near zero), or — when either side was written as
    a decimal string with d ≥ 1 decimals — equal after rounding the other to d decimals, so "1.73"
    matches √3 and "0.33" matches 1/3 while "2" does not match 2.4. Strings go through
    `extract_number`; None never matches.
    """
    a, b = _as_number(pred), _as_number(truth)
    if a is None or b is None:
        return False
    if math.isclose(a[0], b[0], rel_tol=rel_tol, abs_tol=1e-9):
        return True
    for (x, _), (y, d) in ((a, b), (b, a)):
        if (
            d is not None
            and d >= 1
            and math.isclose(round(x, d), y, rel_tol=1e-12, abs_tol=0.5 * 10 ** (-d - 3))
        ):
            return True
    return False


# --------------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------------

BOX_FORMATS = ("norm1", "norm1000", "pixel")
_BNUM = r"-?(?:\d+(?:\.\d+)?|\.\d+)"
_BOX_BRACKET_RE = re.compile(rf"[\[(][ \t]*({_BNUM})\s*,\s*({_BNUM})\s*,\s*({_BNUM})\s*,\s*({_BNUM})\s*[\])]")
_BOX_LOOSE_RE = re.compile(
    rf"(?<![\d.])({_BNUM})[\s,()\[\]]+({_BNUM})[\s,()\[\]]+({_BNUM})[\s,()\[\]]+({_BNUM})"
)


def extract_box(
    text: str, fmt: str, width: float, height: float, pad_to_square: bool = False
) -> list[float] | None:
    """The first box [x1, y1, x2, y2] in a response, in pixels of the original image, or None.

    `fmt` is declared by the caller, never guessed, because the same "[12, 30, 40, 52]" means
    different boxes in 0–1000 and pixel coordinates and a guess would silently mis-score a model:
    "norm1" (0–1, LLaVA-1.5), "norm1000" (0–1000, Qwen-VL/Shikra style), "pixel".

    `pad_to_square`: the model saw the image centred on a square canvas of side max(width, height)
    (LLaVA's expand2square, offsets floored as it pastes them), so its coordinates — in any format —
    refer to that canvas and are mapped back here. This must match training, or every box is shifted.

    Accepts "[x1, y1, x2, y2]", "(x1, y1, x2, y2)" and, failing those, four numbers in a row such as
    "(x1,y1),(x2,y2)". Corners are sorted and the box clipped to the image.
    """
    if fmt not in BOX_FORMATS:
        raise ValueError(f"unknown box format {fmt!r}; expected one of {BOX_FORMATS}")
    if not (width > 0 and height > 0):
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not isinstance(text, str) or not text:
        return None
    m = _BOX_BRACKET_RE.search(text) or _BOX_LOOSE_RE.search(text)
    if m is None:
        return None
    try:
        x1, y1, x2, y2 = (float(g) for g in m.groups())
    except ValueError:
        return None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    if pad_to_square:
        side = max(width, height)
        cw, ch = side, side
        ox, oy = (side - width) // 2, (side - height) // 2
    else:
        cw, ch, ox, oy = width, height, 0, 0
    if fmt == "norm1000":
        x1, y1, x2, y2 = x1 / 1000, y1 / 1000, x2 / 1000, y2 / 1000
    if fmt in ("norm1", "norm1000"):
        x1, x2, y1, y2 = x1 * cw, x2 * cw, y1 * ch, y2 * ch
    x1, x2, y1, y2 = x1 - ox, x2 - ox, y1 - oy, y2 - oy
    x1, x2 = sorted((min(max(x1, 0.0), width), min(max(x2, 0.0), width)))
    y1, y2 = sorted((min(max(y1, 0.0), height), min(max(y2, 0.0), height)))
    return [x1, y1, x2, y2]


def iou(a: Sequence[float] | None, b: Sequence[float] | None) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes (continuous coordinates, x2 exclusive);
    0.0 when either is missing or degenerate, so an unparsable answer scores as a miss."""
    if a is None or b is None or len(a) != 4 or len(b) != 4:
        return 0.0
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


# lmms-eval's RefCOCO scorer (tasks/refcoco/utils_rec.py), reproduced for `rule=official`: the first
# "[a, b, c, d]" with no space before a comma, read as given; IoU with no corner sorting or clipping.
_BOX_OFFICIAL_RE = re.compile(
    r"\[\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?)\s*\]"
)


def extract_box_official(text: str) -> list[float] | None:
    """lmms-eval's `parse_float_sequence_within`: the first "[x1, y1, x2, y2]" in square brackets, as
    written (0–1 of the image), or None where lmms-eval falls back to [0, 0, 0, 0]. Parentheses, corner
    pairs and reversed or out-of-image boxes are taken as they are: that is the public scorer."""
    if not isinstance(text, str):
        return None
    m = _BOX_OFFICIAL_RE.search(text)
    if m is None:
        return None
    try:
        box = [float(g) for g in m.groups()]
    except ValueError:
        return None
    return box if all(math.isfinite(v) for v in box) else None


def iou_official(truth: Sequence[float], pred: Sequence[float]) -> float:
    """lmms-eval's `compute_iou`, unchanged: areas from the corners as given (a reversed box has no
    intersection, so IoU 0). Where its union is 0 lmms-eval divides by zero, and where it is negative
    (a box reversed on one axis) it gives -0.0; both are 0.0 here."""
    x_left, y_top = max(truth[0], pred[0]), max(truth[1], pred[1])
    x_right, y_bottom = min(truth[2], pred[2]), min(truth[3], pred[3])
    inter = max(0.0, x_right - x_left) * max(0.0, y_bottom - y_top)
    union = (truth[2] - truth[0]) * (truth[3] - truth[1]) + (pred[2] - pred[0]) * (pred[3] - pred[1]) - inter
    return float(inter / union) if union > 0 else 0.0
