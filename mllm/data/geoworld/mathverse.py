"""MathVerse-style geometry problems in the official testmini layout (`mathverse/`).

Each problem (a labelled triangle; see `mathfig`) is written in the five image versions plus Text
Only, by moving its facts between the question text and the figure:

- Text Dominant: description + properties + conditions + question in text; figure: labels only.
- Text Lite: the description removed from the text; same figure as Text Dominant.
- Vision Intensive: the implicit properties and the first numeric condition only in the figure.
- Vision Dominant: every property and condition only in the figure; the text is the question.
- Vision Only: the Vision Dominant figure with the question (and choices) drawn under it; the
  text only says to answer the question in the image.
- Text Only (`testmini_text_only.json`): the Text Dominant text, `image` "".

Problems alternate multi-choice (answer a letter; "Choices:\nA:..." in the text, drawn for Vision
Only) and free-form (answer an integer). Figures are drawn at `math_size` px. `scenes.jsonl` is a
side file (not official) with the scene graph of every image.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from .files import write_json, write_jsonl
from .mathfig import PROBLEMS, conditions_sentence, math_scene, sample_problem
from .render import render, save_png
from .sampling import pixel_key, stream
from .scene import MathFigure

VERSIONS: tuple[str, ...] = (
    "Text Dominant",
    "Text Lite",
    "Vision Intensive",
    "Vision Dominant",
    "Vision Only",
)
LETTERS = "ABCD"

_WO = {
    "multi-choice": "Please directly answer the question and provide the correct option letter, "
    "e.g., A, B, C, D.",
    "free-form": "Please directly answer the question and provide the final value, e.g., 1, 2.5, 300.",
}
_COT = {
    "multi-choice": "Please first conduct reasoning, and then answer the question and provide the "
    "correct option letter, e.g., A, B, C, D, at the end.",
    "free-form": "Please first conduct reasoning, and then answer the question and provide the final value, "
    "e.g., 1, 2.5, 300, at the end.",
}
VISION_ONLY_QUESTION = "According to the question shown in the image, please answer the question."


def _choices(rng: random.Random, fig: MathFigure) -> list[str]:
    """Four option values (the answer among them), with the figure's unit."""
    a = int(fig.answer)
    if fig.unit == "°":
        pool = [a + d for d in (-20, -15, -10, -5, 5, 10, 15, 20)] + [180 - a, 90 - a if a < 90 else a - 30]
        pool = [v for v in pool if 0 < v < 180 and v != a]
    else:
        pool = [v for v in (a - 3, a - 2, a - 1, a + 1, a + 2, a + 3, 2 * a, a // 2) if v > 0 and v != a]
    values = [a] + rng.sample(sorted(set(pool)), 3)
    rng.shuffle(values)
    return [f"{v}{fig.unit}" for v in values]


def _entry(qtype: str, question: str, vision_only: bool = False) -> dict[str, str]:
    if vision_only:
        wo = "According to the question shown in the image, " + _WO[qtype][0].lower() + _WO[qtype][1:]
        cot = "According to the question shown in the image, " + _COT[qtype][0].lower() + _COT[qtype][1:]
        return {"question": question, "query_wo": wo, "query_cot": cot}
    return {
        "question": question,
        "query_wo": f"{_WO[qtype]}\nQuestion: {question}",
        "query_cot": f"{_COT[qtype]}\nQuestion: {question}",
    }


def vision_intensive_keys(fig: MathFigure) -> list[str]:
    """Facts only in the Vision Intensive figure: the properties and the first numeric condition,
    or just the properties when that would leave no condition in the text."""
    props = [c.key for c in fig.conditions if c.role == "property"]
    conds = [c.key for c in fig.conditions if c.role == "condition"]
    if len(conds) > 1 or not props:
        return props + conds[:1]
    return props


def _texts(fig: MathFigure, choices_text: str) -> dict[str, str]:
    """Question text of each version (Vision Only's drawn text under key 'drawn')."""
    props = [c for c in fig.conditions if c.role == "property"]
    conds = [c for c in fig.conditions if c.role == "condition"]
    q = fig.question
    full = conditions_sentence(props + conds)
    vi = set(vision_intensive_keys(fig))
    vi_text = conditions_sentence([c for c in fig.conditions if c.key not in vi])
    return {
        "Text Dominant": f"{fig.description} {full} {q}{choices_text}",
        "Text Lite": f"{full} {q}{choices_text}",
        "Vision Intensive": f"{vi_text} {q}".strip() + choices_text,
        "Vision Dominant": f"{q}{choices_text}",
        "drawn": f"{q}{choices_text}",
    }


def write_mathverse(out: Path, seed: int, problems: int, math_size: int, seen: set[bytes]) -> list[dict]:
    """Write testmini.json (5 versions × problems), testmini_text_only.json and the figures."""
    root = out / "mathverse"
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    text_only: list[dict[str, Any]] = []
    scenes: list[dict[str, Any]] = []
    earlier = set(seen)  # figures may repeat across problems (equilateral ones look alike), never train's
    for p in range(problems):
        pid = str(p + 1)
        qtype = "multi-choice" if p % 2 == 0 else "free-form"
        for attempt in range(100):
            rng = stream(seed, "mathverse", p, attempt)
            fig = sample_problem(rng, PROBLEMS[p % len(PROBLEMS)])
            choices = _choices(rng, fig) if qtype == "multi-choice" else []
            choices_text = (
                "\nChoices:\n" + "\n".join(f"{L}:{v}" for L, v in zip(LETTERS, choices)) if choices else ""
            )
            texts = _texts(fig, choices_text)
            props = [c.key for c in fig.conditions if c.role == "property"]
            conds = [c.key for c in fig.conditions if c.role == "condition"]
            every = props + conds
            figures = {
                "base": math_scene(fig, math_size, []),
                "vi": math_scene(fig, math_size, vision_intensive_keys(fig)),
                "vd": math_scene(fig, math_size, every),
                "vo": math_scene(fig, math_size, every, question_text=texts["drawn"]),
            }
            images = {tag: render(s) for tag, s in figures.items()}
            keys = {pixel_key(img) for img in images.values()}
            if len(keys) == len(images) and not keys & earlier:
                break
        else:
            raise RuntimeError(f"could not draw MathVerse problem {pid}")
        seen.update(keys)
        names = {tag: f"{p + 1:04d}_{tag}.png" for tag in figures}
        for tag, img in images.items():
            save_png(img, root / "images" / names[tag])
            scenes.append({"image": names[tag], "problem_index": pid, "scene": figures[tag].to_dict()})
        answer = LETTERS[choices.index(f"{fig.answer}{fig.unit}")] if choices else fig.answer
        meta = {
            "split": "testmini",
            "source": "GeoWorld",
            "subject": "Plane Geometry",
            "subfield": "Angle" if fig.unit == "°" else "Length",
            "problem": fig.problem,
            "choices": choices,
        }
        version_image = {
            "Text Dominant": "base",
            "Text Lite": "base",
            "Vision Intensive": "vi",
            "Vision Dominant": "vd",
            "Vision Only": "vo",
        }
        for version in VERSIONS:
            vo = version == "Vision Only"
            text = VISION_ONLY_QUESTION if vo else texts[version]
            entries.append(
                {
                    "sample_index": str(len(entries) + 1),
                    "problem_index": pid,
                    "problem_version": version,
                    **_entry(qtype, text, vo),
                    "image": names[version_image[version]],
                    "answer": answer,
                    "question_type": qtype,
                    "metadata": meta,
                }
            )
        text_only.append(
            {
                "sample_index": str(len(text_only) + 1),
                "problem_index": pid,
                "problem_version": "Text Only",
                **_entry(qtype, texts["Text Dominant"]),
                "image": "",
                "answer": answer,
                "question_type": qtype,
                "metadata": meta,
            }
        )
    order = [
        "sample_index",
        "problem_index",
        "problem_version",
        "question",
        "image",
        "answer",
        "question_type",
        "metadata",
        "query_wo",
        "query_cot",
    ]
    entries = [{k: e[k] for k in order} for e in entries]
    text_only = [{k: e[k] for k in order} for e in text_only]
    write_json(root / "testmini.json", entries)
    write_json(root / "testmini_text_only.json", text_only)
    write_jsonl(root / "scenes.jsonl", scenes)
    return entries
