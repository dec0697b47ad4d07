"""The MMVP-VLM set for contrastive models, in the official layout.

MMVP-VLM asks a CLIP-style model to match two statements to two images that differ in one visual
pattern. Official layout (what `mllm.evaluation.benchmarks.mmvp_vlm` reads):

    mmvp_vlm/Questions.csv                       `Question ID,Type,Statement`; rows 2k-1 and 2k are pair k
    mmvp_vlm/MLLM_VLM Images/<Type>/<qid>.jpg    the image of each row (JPEG)

Row 2k-1's statement is true of image 2k-1, row 2k's of image 2k (the official scorer takes the first
image as the truth for odd ids). A side file that is NOT part of the official layout,
`scenes.jsonl`, keeps each image's scene graph so tests can check each pair's single difference.

The pairs are MMVP's GeoWorld pairs (`mmvp._pair`: orientation, count, colour, position, presence, size,
relative position, shape), each pattern a `Type`; the statements name the attribute that differs.
"""

from __future__ import annotations

from pathlib import Path

from .files import write_csv, write_jsonl
from .language import describe
from .mmvp import PATTERNS, _pair
from .render import render, save_jpeg
from .sampling import pixel_key, stream
from .scene import Scene
from .vocab import NUMBER_WORDS, PLURALS, with_article

HEADER = ["Question ID", "Type", "Statement"]
IMAGE_DIR = "MLLM_VLM Images"


def statements(pattern: str, a: Scene, b: Scene, ans_a: str, ans_b: str) -> tuple[str, str]:
    """One statement true of `a` (and false of `b`), and one the other way round."""
    ta, tb = a.shapes[0], b.shapes[0]
    if pattern == "orientation":
        return with_article(describe(ta)), with_article(describe(tb))
    if pattern in ("color", "shape"):
        return f"{with_article(ta.color + ' ' + ta.kind)}", f"{with_article(tb.color + ' ' + tb.kind)}"
    if pattern == "size":
        return f"a {ta.size} {ta.kind}", f"a {tb.size} {tb.kind}"
    if pattern == "position":
        return (
            f"{with_article(ta.kind)} on the {ans_a} side of the image",
            f"{with_article(tb.kind)} on the {ans_b} side of the image",
        )
    if pattern == "relative_position":
        k1, k2 = ta.kind, a.shapes[1].kind
        return (
            f"{with_article(k1)} to the {ans_a} of {with_article(k2)}",
            f"{with_article(k1)} to the {ans_b} of {with_article(k2)}",
        )
    if pattern == "count":

        def n(m: str) -> str:
            k = int(m)
            return f"{NUMBER_WORDS[k]} {PLURALS[ta.kind] if k != 1 else ta.kind}"

        return n(ans_a), n(ans_b)
    if pattern == "presence":
        obj = f"{ta.color} {ta.kind}"
        first, second = f"there is {with_article(obj)}", f"there is no {obj}"
        return (first, second) if ans_a == "yes" else (second, first)
    raise ValueError(f"unknown MMVP-VLM pattern {pattern!r}")


def write_mmvp_vlm(
    out: Path, seed: int, pairs_per_pattern: int, size: int, seen: set[bytes]
) -> list[list[str]]:
    """Write `mmvp_vlm/` with `pairs_per_pattern` pairs of every pattern (grouped by pattern, as the
    official file is); return the CSV rows."""
    root = out / "mmvp_vlm"
    rows: list[list[str]] = []
    scenes: list[dict] = []
    qid = 0
    for pattern in PATTERNS:
        (root / IMAGE_DIR / pattern).mkdir(parents=True, exist_ok=True)
        for k in range(pairs_per_pattern):
            for attempt in range(500):
                rng = stream(seed, f"mmvp_vlm:{pattern}", k, attempt)
                pair = _pair(rng, pattern, size)
                if pair is None:
                    continue
                a, b, _, ans_a, ans_b = pair
                img_a, img_b = render(a), render(b)
                ka, kb = pixel_key(img_a), pixel_key(img_b)
                if ans_a != ans_b and ka != kb and ka not in seen and kb not in seen:
                    break
            else:
                raise RuntimeError(f"could not draw MMVP-VLM pair {k} ({pattern})")
            seen.update((ka, kb))
            if rng.random() < 0.5:
                a, b, ans_a, ans_b, img_a, img_b = b, a, ans_b, ans_a, img_b, img_a
            s_a, s_b = statements(pattern, a, b, ans_a, ans_b)
            for scene, img, text in ((a, img_a, s_a), (b, img_b, s_b)):
                qid += 1
                rel = f"{IMAGE_DIR}/{pattern}/{qid}.jpg"
                save_jpeg(img, root / rel)
                rows.append([str(qid), pattern, text])
                scenes.append(
                    {
                        "qid": qid,
                        "image": rel,
                        "pattern": pattern,
                        "statement": text,
                        "scene": scene.to_dict(),
                    }
                )
    write_csv(root / "Questions.csv", HEADER, rows)
    write_jsonl(root / "scenes.jsonl", scenes)
    return rows
