"""How `mllm view`'s page scales with a report's size: a 3,000-question POPE report against a 50-question
one (one page of cards), both with two results over the same 50 images, opened in headless Chromium.

    python bench/viewer_open.py            # 5 rounds
    python bench/viewer_open.py --quick    # 2 rounds

The page draws one page of cards at a time, so opening (file:// -> the script's `data-ready`) and paging
to the last page should cost about the same whatever the report's size; the ratios (3,000 / 50) say how
far that holds. Building the report (thumbnails, cards, the HTML) is timed once each, for context.
Needs playwright and a system Chromium (`MLLM_CHROMIUM`, or one on PATH), as the browser tests do.
The last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, median, result
from PIL import Image

from mllm.evaluation.runner import run_eval
from mllm.viewer import build_view

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def pope_report(root: Path, questions_per_split: int) -> Path:
    """A POPE folder of 50 images and `questions_per_split` questions a split, two scored runs, the view."""
    data = root / "pope"
    (data / "images").mkdir(parents=True)
    for i in range(50):
        Image.new("RGB", (64, 48), (i * 5, 100, 200 - i * 3)).save(data / "images" / f"{i}.png")
    for split in ("random", "popular", "adversarial"):
        rows = [
            {
                "question_id": q,
                "image": f"{q % 50}.png",
                "text": f"Is there a thing {q}?",
                "label": "yes" if q % 2 else "no",
            }
            for q in range(questions_per_split)
        ]
        (data / f"coco_pope_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = []
    for k in range(2):  # answers right except every (3 + k)-th, so the two results disagree somewhere
        preds = root / f"r{k}.preds.jsonl"
        with open(preds, "w") as f:
            for split in ("random", "popular", "adversarial"):
                for q in range(questions_per_split):
                    gold = "yes" if q % 2 else "no"
                    wrong = (q + k) % (3 + k) == 0
                    answer = ("no" if gold == "yes" else "yes") if wrong else gold
                    f.write(json.dumps({"question_id": f"{split}/{q}", "response": answer}) + "\n")
        out = root / f"r{k}.json"
        run_eval("pope", data, out, predictions=preds)
        runs.append(out)
    return build_view(runs, root / "view")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds = 2 if args.quick else args.rounds
    exe = os.environ.get("MLLM_CHROMIUM") or next(filter(None, (shutil.which(b) for b in BROWSERS)), None)
    if exe is None:
        sys.exit("no Chromium: set MLLM_CHROMIUM or put chromium on PATH")
    from playwright.sync_api import expect, sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        pages, built = {}, {}
        for name, per_split in (("small", 17), ("large", 1000)):  # 51 and 3,000 questions
            t0 = time.perf_counter()
            pages[name] = pope_report(Path(tmp) / name, per_split)
            built[name] = time.perf_counter() - t0
        opened: dict[str, list[float]] = {k: [] for k in pages}
        paged: dict[str, list[float]] = {k: [] for k in pages}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
            for r in range(rounds + 1):  # round 0 warms the browser up and is not kept
                for name, html in pages.items():
                    page = browser.new_page(viewport={"width": 1400, "height": 1000})
                    t0 = time.perf_counter()
                    page.goto(html.as_uri())
                    page.wait_for_selector("body[data-ready]")
                    t1 = time.perf_counter()
                    total = page.locator("#page").inner_text().split(" of ")[1]
                    page.click("#last")
                    expect(page.locator("#page")).to_have_text(f"page {total} of {total}")
                    t2 = time.perf_counter()
                    page.close()
                    if r:
                        opened[name].append(t1 - t0)
                        paged[name].append(t2 - t1)
                if r:
                    print(
                        f"round {r}/{rounds}: " + ", ".join(f"{k} open {opened[k][-1]:.3f}s" for k in pages),
                        flush=True,
                    )
            browser.close()
    values = {
        "machine": machine(),
        "build_s": {k: round(v, 2) for k, v in built.items()},
        "open_s": {k: round(median(v), 3) for k, v in opened.items()},
        "last_page_s": {k: round(median(v), 3) for k, v in paged.items()},
        "open_ratio_3000_vs_51": round(median(opened["large"]) / median(opened["small"]), 2),
        "last_page_ratio_3000_vs_51": round(median(paged["large"]) / median(paged["small"]), 2),
    }
    result(values)


if __name__ == "__main__":
    main()
