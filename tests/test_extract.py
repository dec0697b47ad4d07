"""Answer extraction: examples from real model outputs plus properties (hypothesis) that every
extractor must keep on any text: never raise, fixed points on clean answers, letters in any dress,
articles never read as options, and box formats that round-trip to pixels."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mllm.evaluation.extract import (
    BOX_FORMATS,
    extract_answer_text,
    extract_box,
    extract_box_official,
    extract_number,
    extract_option,
    extract_yes_no,
    iou,
    iou_official,
    is_number_answer,
    normalise,
    numbers_match,
    parse_choices,
    parse_options,
    pope_yes_no,
    text_answer_matches,
)

OPEN_CLOSED = {"a": "Open", "b": "Closed"}
ANGLES = {"A": "60°", "B": "35°", "C": "50°", "D": "30°"}
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------------


def test_parse_options_and_choices():
    assert parse_options("(a) Open (b) Closed") == OPEN_CLOSED
    assert parse_choices("Find angle C.\nChoices:\nA:60°\nB:35°\nC:50°\nD:30°") == ANGLES
    assert parse_choices("Which? Choices: A. 1 B. 2 C. 3") == {"A": "1", "B": "2", "C": "3"}
    assert parse_choices("no choices here") == {}
    assert normalise("  The Cat. ") == "the cat"


@pytest.mark.parametrize(
    "response",
    [
        "(b)",
        "B.",
        "b)",
        "**B**",
        "The answer is b",
        "Answer: B",
        "B",
        "Option B",
        "\\boxed{B}",
        "There is a dog on the left, so B",
        "Closed",
        "The eyes are closed.",
        "B because the door is shut",
        "The door is not open",
        "  (B) Closed  ",
        "I'd go with option b.",
    ],
)
def test_option_b_in_any_dress(response):
    assert extract_option(response, OPEN_CLOSED) == "b"


@pytest.mark.parametrize(
    "response",
    [
        "a red circle",
        "There is a dog.",
        "The answer is a red circle",
        "",
        "   ",
        "(a) and (b)",
        "A and B.",
        "The answer is A. No wait, the answer is B.",
        "open or closed, hard to say",
    ],
)
def test_option_none_when_not_told(response):
    assert extract_option(response, OPEN_CLOSED) is None


def test_option_article_is_not_a_but_a_dressed_a_is():
    assert extract_option("a", OPEN_CLOSED) == "a"
    assert extract_option("(a)", OPEN_CLOSED) == "a"
    assert extract_option("The answer is a", OPEN_CLOSED) == "a"
    assert extract_option("Option a is right", OPEN_CLOSED) == "a"
    assert extract_option("A. Open", OPEN_CLOSED) == "a"


def test_option_mathverse_choices():
    assert extract_option("C", ANGLES) == "C"
    assert extract_option("angle C = 50°", ANGLES) == "C"  # the label C is not the option, 50° is
    assert extract_option("50 degrees", ANGLES) == "C"
    assert extract_option("We need angle C. It equals 50°.", ANGLES) == "C"
    assert extract_option("A triangle's angles sum to 180°, so the answer is C.", ANGLES) == "C"
    assert extract_option("A triangle has three sides.", ANGLES) is None


def test_option_text_inside_a_longer_option():
    options = {"a": "red", "b": "dark red"}
    assert extract_option("dark red", options) == "b"
    assert extract_option("It is red.", options) == "a"
    assert extract_option("red, not dark red", options) == "a"


def test_option_returns_the_key_spelling():
    assert extract_option("b", {"A": "x", "B": "y"}) == "B"
    assert extract_option("B", {"a": "x", "b": "y"}) == "b"
    assert extract_option("anything", {}) is None


@pytest.mark.parametrize(
    "text,official,strict",
    [
        ("Yes", "yes", "yes"),
        ("No", "no", "no"),
        ("Yes.", "yes", "yes"),
        ("No, there is not.", "no", "no"),
        ("There is no dog in the image.", "no", "no"),
        ("There is a dog in the image.", "yes", "yes"),
        ("I don't think so", "yes", "no"),  # the official rule misses contractions; strict does not
        ("probably yes", "yes", "yes"),
        ("unlikely", "yes", "no"),
        ("I'm not sure.", "no", None),
        ("Yes and no", "no", None),
        ("NO", "yes", "no"),  # official quirk kept on purpose: only "No"/"no"/"not" count
        ("Yes. But not in the corner.", "yes", "yes"),  # first sentence only
        ("", None, None),
        ("  ", None, None),
    ],
)
def test_yes_no(text, official, strict):
    assert pope_yes_no(text) == official
    assert extract_yes_no(text) == strict


@pytest.mark.parametrize(
    "text,value",
    [
        ("30 degrees", 30),
        ("12 cm", 12),
        ("30°", 30),
        ("45^\\circ", 45),
        ("3/4", 0.75),
        ("\\frac{3}{4}", 0.75),
        ("2√3", 2 * math.sqrt(3)),
        ("\\sqrt{3}", math.sqrt(3)),
        ("$2\\sqrt{3}$", 2 * math.sqrt(3)),
        ("\\frac{\\sqrt{3}}{2}", math.sqrt(3) / 2),
        ("\\boxed{12}", 12),
        ("Answer: 12", 12),
        ("The answer is 12 cm. Because 5 + 7 = 12.", 12),
        ("1,234", 1234),
        ("-5", -5),
        ("−5", -5),
        ("x = -3", -3),
        ("3.14", 3.14),
        ("0.5", 0.5),
        ("50%", 50),
        ("2π", 2 * math.pi),
        ("1e-07", 1e-07),
        ("angle A = 55°, B = 75°, so C = 50°", 50),
        ("the answer is 5 + 7 = 12.", 12),
        ("\\boxed{\\frac{1}{2}} and then 7", 0.5),
        ("It is 1,000,000.5 m", 1000000.5),
    ],
)
def test_extract_number(text, value):
    assert extract_number(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "no numbers here", "1/0", "√", "-"])
def test_extract_number_none(text):
    assert extract_number(text) is None


def test_numbers_match_rounding():
    assert numbers_match("1.73", math.sqrt(3))
    assert numbers_match("The side is 2√3 cm", "3.46")
    assert numbers_match("0.33", "1/3")
    assert numbers_match("12", 12.0)
    assert not numbers_match("2", 2.4)
    assert not numbers_match("1.8", math.sqrt(3))
    assert not numbers_match(None, 3)
    assert not numbers_match("no number", 3)
    assert is_number_answer("30°") and is_number_answer("2\\sqrt{3}") and is_number_answer("12 cm")
    assert not is_number_answer("(1, 3)") and not is_number_answer("y = 2x + 1") and not is_number_answer("B")
    assert extract_answer_text("Reasoning...\nAnswer: (1, 3]") == "(1, 3]"
    assert extract_answer_text("so \\boxed{y=2x+1}.") == "y=2x+1"
    assert extract_answer_text("  ") is None


def test_extract_box_formats_and_padding():
    assert extract_box("[0.1, 0.2, 0.5, 0.6]", "norm1", 200, 100) == pytest.approx([20, 20, 100, 60])
    assert extract_box("[100, 200, 500, 600]", "norm1000", 200, 100) == pytest.approx([20, 20, 100, 60])
    assert extract_box("The box is (20, 20, 100, 60).", "pixel", 200, 100) == pytest.approx([20, 20, 100, 60])
    assert extract_box("<box>(100,200),(500,600)</box>", "norm1000", 200, 100) == pytest.approx(
        [20, 20, 100, 60]
    )
    # padded: the 200x100 image sits 50 px down a 200x200 square
    assert extract_box("[0.1, 0.35, 0.5, 0.55]", "norm1", 200, 100, pad_to_square=True) == pytest.approx(
        [20, 20, 100, 60]
    )
    assert extract_box("[0.5, 0.6, 0.1, 0.2]", "norm1", 200, 100) == pytest.approx(
        [20, 20, 100, 60]
    )  # sorted
    assert extract_box("no box", "norm1", 10, 10) is None
    assert extract_box("[1, 2, 3]", "pixel", 10, 10) is None
    with pytest.raises(ValueError, match="box format"):
        extract_box("[1, 2, 3, 4]", "auto", 10, 10)


def test_official_scorers_by_hand():
    """POPE's and lmms-eval's public scorers, quirks included: what `rule=official` scores by."""
    assert pope_yes_no("") is None and pope_yes_no("", official=True) == "yes"
    assert pope_yes_no("   ", official=True) == "yes" and pope_yes_no("NO", official=True) == "yes"
    assert extract_box_official("Sure. [0.1, 0.2, 0.5, 0.6] and [0, 0, 1, 1]") == [0.1, 0.2, 0.5, 0.6]
    assert extract_box_official("(0.1, 0.2, 0.5, 0.6)") is None  # brackets only
    assert extract_box_official("[0.1 , 0.2, 0.5, 0.6]") is None  # no space before a comma
    assert extract_box_official("[0.5, 0.6, 0.1, 0.2]") == [0.5, 0.6, 0.1, 0.2]  # not sorted
    assert iou_official([0.1, 0.2, 0.5, 0.6], [0.5, 0.6, 0.1, 0.2]) == 0.0  # reversed: no overlap
    assert iou_official([0.1, 0.1, 0.3, 0.3], [0.1, 0.1, 0.3, 0.5]) == pytest.approx(0.5)  # not clipped
    assert iou_official([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0  # lmms-eval divides by zero here


def test_iou_by_hand():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert iou(None, [0, 0, 1, 1]) == 0.0
    assert iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


PATHOLOGICAL = [
    " " * 50_000,
    "cm^" * 16_000,
    "a" + " " * 50_000 + "^2",
    "\\mathrm{" * 8_000,
    "not even " * 6_000,
    "[0.1," * 10_000,
    "1" * 50_000,
    "1," * 25_000,
    "answer " + " " * 50_000 + "x",
    "(" * 50_000,
    "\\sqrt{" * 8_000,
    "\\sqrt{" + " " * 50_000,
    "\\boxed{" * 7_000,
    "[1," * 16_000,
    "A. " * 16_000,
    "^" + " " * 50_000,
    "1." * 25_000,
    "-" * 50_000,
    "√" * 50_000,
    "1/" * 25_000,
    "a " * 25_000,
    "**" * 25_000,
    "(1" * 25_000,
    "The answer is a" + " " * 50_000 + "dog",
    "é漢字🙂" * 12_000,
    "open closed " * 8_000,
    "not open " * 8_000,
]


@pytest.mark.parametrize("text", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_huge_pathological_inputs_are_linear(text):
    t0 = time.perf_counter()
    extract_option(text, OPEN_CLOSED)
    extract_option(text, ANGLES)
    extract_yes_no(text)
    pope_yes_no(text)
    extract_number(text)
    extract_box(text, "norm1", 10, 10)
    extract_box_official(text)
    parse_choices("Choices: " + text)
    is_number_answer(text)
    text_answer_matches(text, "even")
    text_answer_matches(text, "y=2x+1")
    text_answer_matches("The function is even.", text)
    extract_option(text, {"a": '"Happy Easter"', "b": '"Happy Easter!"'})
    assert time.perf_counter() - t0 < 3.0


# --------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------

TOKENS = st.sampled_from(
    [
        "a",
        "A",
        "b",
        "B",
        "C",
        "(",
        ")",
        "[",
        "]",
        "{",
        "}",
        ",",
        ".",
        ":",
        " ",
        "\n",
        "-",
        "/",
        "√",
        "π",
        "°",
        "\\",
        "\\boxed{",
        "\\sqrt",
        "\\frac{",
        "answer",
        "Answer:",
        " is ",
        "option",
        "yes",
        "no",
        "not",
        "1",
        "2",
        "0.5",
        "1e",
        "**",
        "$",
        "^\\circ",
        "angle",
        "so",
        "the",
        "open",
        "closed",
    ]
)
ANY_TEXT = st.one_of(
    st.text(), st.text(alphabet=st.characters(), max_size=2000), st.lists(TOKENS).map("".join)
)


@FAST
@given(ANY_TEXT)
def test_extractors_never_raise(text):
    assert extract_option(text, OPEN_CLOSED) in (None, "a", "b")
    assert extract_option(text, ANGLES) in (None, "A", "B", "C", "D")
    assert pope_yes_no(text) in (None, "yes", "no")
    assert extract_yes_no(text) in (None, "yes", "no")
    n = extract_number(text)
    assert n is None or (isinstance(n, float) and math.isfinite(n))
    assert isinstance(numbers_match(text, 3), bool)
    assert isinstance(is_number_answer(text), bool)
    assert extract_answer_text(text) is None or isinstance(extract_answer_text(text), str)
    assert isinstance(parse_choices(text), dict) and isinstance(parse_options(text), dict)
    for fmt in BOX_FORMATS:
        for pad in (False, True):
            box = extract_box(text, fmt, 64, 48, pad)
            assert box is None or (0 <= box[0] <= box[2] <= 64 and 0 <= box[1] <= box[3] <= 48)
    assert isinstance(text_answer_matches(text, "even"), bool)
    assert isinstance(text_answer_matches("even", text), bool)
    box = extract_box_official(text)
    assert box is None or (len(box) == 4 and all(math.isfinite(v) for v in box))
    if box is not None:
        assert 0.0 <= iou_official([0.1, 0.1, 0.5, 0.5], box) <= 1.0


@FAST
@given(st.integers(min_value=-(2**53), max_value=2**53))
def test_number_fixed_point_int(x):
    assert extract_number(str(x)) == x
    assert numbers_match(str(x), x)


@FAST
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_number_fixed_point_float(x):
    assert extract_number(str(x)) == x
    assert numbers_match(str(x), x)


UNITS = ["cm", "\\mathrm{cm}^3", "\\mathrm{~cm}^{2}", "cm²", "m/s", "square units", "°", "%"]


@FAST
@given(
    st.integers(min_value=-(10**9), max_value=10**9),
    st.sampled_from(UNITS),
    st.sampled_from(["", "Area =", "V="]),
)
def test_number_with_units_fixed_point(x, unit, label):
    """A value in a unit (its exponent too) and behind a label is one number: itself."""
    answer = f"{label} {x} {unit}".strip()
    assert is_number_answer(answer), answer
    assert extract_number(answer) == x and numbers_match(str(x), answer)


TRUTH_WORDS = ["even", "odd", "neither", "parallel", "increasing", "y=2x+1", "x>3", "(1,3]", "no solution"]


@FAST
@given(
    st.sampled_from(TRUTH_WORDS), st.sampled_from(["{t}", "The answer is {t}.", "So it is {t}.", "$ {t} $"])
)
def test_text_answer_fixed_point(truth, dress):
    """A word or expression answer matches itself in any plain dress, and not when negated."""
    assert text_answer_matches(dress.format(t=truth), truth)
    assert not text_answer_matches(f"It is not {truth}.", truth)


@FAST
@given(st.sampled_from(["yes", "no", "Yes", "No", "yes.", "No."]))
def test_yes_no_fixed_point(ans):
    assert extract_yes_no(ans) == ans.lower().strip(".")
    assert pope_yes_no(ans) == ans.lower().strip(".")
    assert pope_yes_no(ans, official=True) == ans.lower().strip(".")


WORDS = ["red", "blue", "circle", "square", "up", "down", "left", "right", "open", "closed", "large", "tiny"]
OPTION_TEXT = st.lists(st.sampled_from(WORDS), min_size=1, max_size=3).map(" ".join)


@st.composite
def option_sets(draw):
    n = draw(st.integers(min_value=2, max_value=5))
    texts = draw(st.lists(OPTION_TEXT, min_size=n, max_size=n, unique=True))
    upper = draw(st.booleans())
    letters = "ABCDE"[:n] if upper else "abcde"[:n]
    return dict(zip(letters, texts))


DRESSES = [
    "{L}",
    "({L})",
    "{L}.",
    "{L})",
    "**{L}**",
    "**({L})**",
    "The answer is {L}",
    "The answer is {L}.",
    "Answer: {L}",
    "answer: ({L})",
    "Option {L}",
    "The correct option is ({L}).",
    "\\boxed{{{L}}}",
    "{L}. {text}",
    "({L}) {text}",
    "There is a dog on the left, so {L}",
    "I see a {text}, so the answer is {L}.",
    "  {L}  ",
    "{L}\n",
]


@FAST
@given(option_sets(), st.data())
def test_letters_round_trip_in_any_dress(options, data):
    key = data.draw(st.sampled_from(sorted(options)))
    dress = data.draw(st.sampled_from(DRESSES))
    case = data.draw(st.sampled_from([str.upper, str.lower]))
    response = dress.format(L=case(key), text=options[key])
    assert extract_option(response, options) == key, response


@FAST
@given(option_sets())
def test_option_text_round_trips(options):
    for key, text in options.items():
        # A text inside another option's text ("red" in "red circle") names both: only check the rest.
        if not any(text != other and text in other for other in options.values()):
            assert extract_option(text, options) == key
            assert extract_option(f"It is {text}.", options) == key


@FAST
@given(OPTION_TEXT, st.sampled_from(["!", "?", "."]))
def test_options_differing_by_punctuation_stay_apart(text, mark):
    """MMVP's `(a) "Happy Easter" (b) "Happy Easter!"`: the exact text decides before normalising."""
    options = {"a": f'"{text}"', "b": f'"{text}{mark}"'}
    assert extract_option(f"{text}{mark}", options) == "b"
    assert extract_option(f"The sign says {text}{mark}", options) == "b"
    assert extract_option(text, options) == "a"


ARTICLE_NOUNS = ["dog", "cat", "tree", "house", "picture", "small thing", "person on the bench"]


@FAST
@given(
    st.sampled_from(["a", "A"]),
    st.sampled_from(ARTICLE_NOUNS),
    st.sampled_from(
        [
            "There is {art} {noun} here",
            "{art} {noun}",
            "{art} {noun} is visible.",
            "I see {art} {noun}, maybe.",
            "It looks like {art} {noun}",
        ]
    ),
)
def test_article_a_is_never_option_a(art, noun, template):
    options = {"a": "Open", "b": "Closed"}
    text = template.format(art=art, noun=noun)
    assert extract_option(text, options) is None
    assert extract_option(text + ", so B", options) == "b"
    assert extract_option(text + ". The answer is (b)", options) == "b"


@FAST
@given(
    st.integers(min_value=8, max_value=2000),
    st.integers(min_value=8, max_value=2000),
    st.floats(0, 1),
    st.floats(0, 1),
    st.floats(0, 1),
    st.floats(0, 1),
    st.sampled_from(BOX_FORMATS),
    st.booleans(),
)
def test_box_round_trip(w, h, fx1, fy1, fx2, fy2, fmt, pad):
    x1, x2 = sorted((fx1 * w, fx2 * w))
    y1, y2 = sorted((fy1 * h, fy2 * h))
    side_w, side_h = (max(w, h), max(w, h)) if pad else (w, h)
    ox, oy = ((max(w, h) - w) // 2, (max(w, h) - h) // 2) if pad else (0, 0)
    cx = [x1 + ox, y1 + oy, x2 + ox, y2 + oy]
    if fmt == "norm1":
        text = "[" + ", ".join(f"{v / s:.3f}" for v, s in zip(cx, (side_w, side_h) * 2)) + "]"
        tol = 0.0005 * max(side_w, side_h)
    elif fmt == "norm1000":
        text = "[" + ", ".join(str(round(v / s * 1000)) for v, s in zip(cx, (side_w, side_h) * 2)) + "]"
        tol = 0.0005 * max(side_w, side_h)
    else:
        text = "[" + ", ".join(str(round(v)) for v in cx) + "]"
        tol = 0.5
    box = extract_box(f"Sure: {text}", fmt, w, h, pad)
    assert box is not None
    assert box == pytest.approx([x1, y1, x2, y2], abs=tol + 1e-6)


@FAST
@given(
    st.lists(st.floats(0, 100), min_size=4, max_size=4), st.lists(st.floats(0, 100), min_size=4, max_size=4)
)
def test_iou_properties(a, b):
    a = [min(a[0], a[2]), min(a[1], a[3]), max(a[0], a[2]), max(a[1], a[3])]
    b = [min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])]
    v = iou(a, b)
    assert 0.0 <= v <= 1.0 + 1e-12
    assert v == pytest.approx(iou(b, a))
    if (a[2] - a[0]) * (a[3] - a[1]) > 1e-6:
        assert iou(a, a) == pytest.approx(1.0)
