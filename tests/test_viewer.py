"""`mllm view` over real `mllm eval` results, and the report in a real headless browser.

The results are what `mllm eval --predictions` writes for a small GeoWorld: two "checkpoints" that get
different items wrong, so the report has disagreements to put first. The browser tests open the report
from disk (file://, as a reader would), count the cards, change a filter and keep a screenshot; one of
them opens a 3,000-item POPE run and times it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from browser import artefact_dir, browser_page
from PIL import Image

from mllm.cli import main
from mllm.data.geoworld import write_world
from mllm.evaluation.benchmarks import get_benchmark
from mllm.evaluation.runner import run_eval
from mllm.viewer import build_view
from mllm.viewer.page import parse_data_overrides

BENCHES = ("pope", "mmvp", "refcoco", "mathverse", "qa")
EVIL = "</script><script>document.title='pwned'</script><img src=x onerror=alert(1)>"


def right(bench: str, meta: dict) -> str:
    if bench == "pope":
        return meta["label"]
    if bench == "mmvp":
        return f"({meta['answer']})"
    if bench == "refcoco":
        x1, y1, x2, y2 = meta["bbox"]
        return f"[{x1 / meta['width']:.3f}, {y1 / meta['height']:.3f}, {x2 / meta['width']:.3f}, {y2 / meta['height']:.3f}]"
    return meta["answer"]


def wrong(bench: str, meta: dict) -> str:
    if bench == "pope":
        return "no" if meta["label"] == "yes" else "yes"
    if bench == "mmvp":
        return "(a)" if meta["answer"] == "b" else "(b)"
    if bench == "refcoco":
        return "[0.0, 0.0, 0.1, 0.1]"
    return EVIL  # text the page must show as text, never run


def evaluate(bench: str, data: Path, out: Path, wrong_every: int, offset: int) -> Path:
    """`mllm eval BENCH --predictions` on answers that are wrong for every `wrong_every`-th item."""
    b = get_benchmark(bench)
    preds = out.with_suffix(".preds.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(preds, "w") as f:
        for k, it in enumerate(b.load(data)):
            resp = wrong(bench, it.meta) if (k + offset) % wrong_every == 0 else right(bench, it.meta)
            f.write(json.dumps({b.id_key: it.id, "response": resp}) + "\n")
    run_eval(bench, data, out, predictions=preds)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("view")
    world = root / "world"
    write_world(world, seed=1, n=8, mmvp_pairs=8, pope_questions=12, refcoco_n=8, mathverse_problems=4)
    out = {}
    for bench in BENCHES:
        data = world if bench == "qa" else world / bench
        out[bench] = [
            evaluate(bench, data, root / "res" / f"{bench}-a.json", 3, 0),
            evaluate(bench, data, root / "res" / f"{bench}-b.json", 4, 1),
        ]
    return root, out


def page_data(html: Path) -> dict:
    text = html.read_text(encoding="utf-8")
    blob = re.search(r'<script id="data" type="application/json">(.*?)</script>', text, re.S)
    assert blob is not None
    return json.loads(blob.group(1))


def test_the_report_holds_every_item_with_its_image(results, tmp_path):
    _, res = results
    html = build_view([p for b in BENCHES for p in res[b]], tmp_path / "v")
    data = page_data(html)
    groups = {g["benchmark"]: g for g in data["groups"]}
    assert list(groups) == list(BENCHES)
    for bench, g in groups.items():
        records = [json.loads(ln) for ln in res[bench][0].with_suffix(".jsonl").read_text().splitlines()]
        meta = json.loads(res[bench][0].read_text())["meta"]
        pictures = sum(it.image is not None for it in get_benchmark(bench).load(Path(meta["data"])))
        assert g["items"] == len(records) and g["images"] == pictures > 0, bench  # every item, every picture
        assert [r["tag"] for r in g["results"]] == ["A", "B"]
        ranks = [c["rank"] for c in g["cards"]]
        assert ranks == sorted(ranks) and 0 in ranks and 1 in ranks, (
            bench
        )  # disagreements first, A-right first
        for c in g["cards"]:
            a, b = c["ok"]
            assert c["rank"] == (2 if a == b else 0 if a else 1)
    for c in groups["pope"]["cards"]:
        thumb = tmp_path / "v" / c["items"][0]["thumb"]
        with Image.open(thumb) as im:  # the page reserves the thumbnail's own size before it loads
            assert list(im.size) == list(c["items"][0]["thumb_size"])
    assert {"split"} == set(groups["pope"]["facets"]) and groups["qa"]["facets"].keys() == {"category"}
    assert set(groups["mathverse"]["facets"]["version"]) >= {"Text Dominant", "Vision Only"}
    # MMVP: a card is a pair, both images side by side, with the pattern the pair differs in
    mmvp = groups["mmvp"]
    assert mmvp["pairs"] and len(mmvp["cards"]) == 8 and all(len(c["items"]) == 2 for c in mmvp["cards"])
    assert len(mmvp["facets"]["pattern"]) == 8 and all("pattern" in c["facets"] for c in mmvp["cards"])
    # POPE: per split a confusion matrix a result, adding up to the split's questions
    matrices = [p for p in groups["pope"]["panels"] if p["type"] == "matrix"]
    assert [m["title"].split(":")[0] for m in matrices] == ["random", "popular", "adversarial"]
    assert all(
        sum(map(sum, b["cells"])) == 12 and "yes-ratio" in b["note"] for m in matrices for b in m["blocks"]
    )
    # RefCOCO: gold and predicted boxes in the image's own pixels
    it = groups["refcoco"]["cards"][0]["items"][0]
    assert len(it["gold_box"]) == 4 and it["size"] == [64, 64] and len(it["r"][0]["box"]) == 4
    text = html.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing from the network
    assert text.count("</script>") == 2  # the data cannot close its own script tag


def test_view_cli_and_moved_data(results, tmp_path, capsys):
    root, res = results
    assert main(["view", str(res["pope"][0]), "--out", str(tmp_path / "one")]) == 0
    assert "index.html" in capsys.readouterr().out
    moved = root / "moved"
    if not moved.exists():
        (root / "world").rename(moved)
    try:
        data = page_data(build_view([res["pope"][0]], tmp_path / "gone"))
        assert data["groups"][0]["images"] == 0 and data["groups"][0]["items"] == 36  # a report, no pictures
        assert "name the folder with --data" in capsys.readouterr().err
        data = page_data(build_view([res["pope"][0]], tmp_path / "back", data=[f"pope={moved / 'pope'}"]))
        assert data["groups"][0]["images"] == 36
    finally:
        moved.rename(root / "world")
    assert parse_data_overrides(["pope=/x", "/y"]) == {"pope": Path("/x"), "*": Path("/y")}


def test_view_refuses_what_is_not_a_result(tmp_path):
    (tmp_path / "x.json").write_text('{"accuracy": 1}')
    assert main(["view", str(tmp_path / "x.json"), "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "y.json").write_text('{"accuracy": 1, "meta": {"benchmark": "pope"}}')
    with pytest.raises(FileNotFoundError, match="per-item records"):
        build_view([tmp_path / "y.json"], tmp_path / "o")


def test_report_in_a_browser(results, tmp_path, tmp_path_factory):
    """Opened from disk: the cards of the first page, a filter that changes them, pairs side by side."""
    _, res = results
    html = build_view([p for b in BENCHES for p in res[b]], tmp_path / "v")
    with browser_page() as page:
        page.goto(html.as_uri())
        page.wait_for_selector("body[data-ready]")
        assert page.title() != "pwned" and page.errors == []
        count = page.locator("#count")
        assert page.locator("article.card").count() == int(count.get_attribute("data-shown")) == 36  # POPE
        assert page.locator("article.card.disagree").count() > 0
        page.select_option("#facet-split", "popular")
        assert count.get_attribute("data-matching") == "12" and page.locator("article.card").count() == 12
        page.select_option("#outcome-0", "wrong")
        wrong_a = int(count.get_attribute("data-matching"))
        assert 0 < wrong_a < 12 and page.locator(".chip.bad", has_text="A wrong").count() == wrong_a
        page.fill("#q", "popular/3")
        assert int(count.get_attribute("data-matching")) <= 1
        page.click("#tabs button:has-text('mmvp')")
        assert (
            page.locator("article.card.pair").count() == 8
            and page.locator("article.card.pair .item").count() == 16
        )
        page.click("#tabs button:has-text('qa')")  # the wrong answers there are markup, shown as text
        page.select_option("#outcome-0", "wrong")
        assert page.locator(".resp", has_text="<script>").count() > 0 and page.title() != "pwned"
        page.click("#tabs button:has-text('refcoco')")
        assert page.locator("figure svg rect").count() >= 2 * page.locator("article.card").count()
        page.click("#tabs button:has-text('pope')")
        page.screenshot(path=str(artefact_dir(tmp_path_factory) / "viewer.png"))
        assert page.errors == []


def test_three_thousand_items_page_and_filter(tmp_path, tmp_path_factory):
    """A POPE run of 3,000 questions (1,000 a split) over 50 images, two results: the page draws one page
    of cards, pages to the last and filters. How fast it opens is bench/viewer_open.py's to measure."""
    data = tmp_path / "pope"
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
            for q in range(1000)
        ]
        (data / f"coco_pope_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = [evaluate("pope", data, tmp_path / f"r{k}.json", 3 + k, k) for k in range(2)]
    html = build_view(runs, tmp_path / "v")
    assert html.stat().st_size < 3_000_000
    with browser_page() as page:
        page.goto(html.as_uri())
        page.wait_for_selector("body[data-ready]")
        count = page.locator("#count")
        assert count.get_attribute("data-total") == "3000" and page.locator("article.card").count() == 50
        # every thumbnail holds its place before it loads (width and height from the thumbnail): CI saw
        # the click on "last" miss twice ("page 1 of 60") while lazily loaded images moved the pager down
        sizes = page.eval_on_selector_all(
            "article.card img", "imgs => imgs.map(i => [i.getAttribute('width'), i.getAttribute('height')])"
        )
        assert len(sizes) == 50 and all(w and h and int(w) > 0 and int(h) > 0 for w, h in sizes), sizes[:3]
        # the page redraws after the event handler returns: wait (Playwright's web-first assertions, 5 s)
        # for the same values rather than reading them before the redraw
        from playwright.sync_api import expect

        page.click("#last")
        expect(page.locator("#page")).to_have_text("page 60 of 60")
        page.select_option("#facet-split", "adversarial")
        expect(count).to_have_attribute("data-matching", "1000")
        page.screenshot(path=str(artefact_dir(tmp_path_factory) / "viewer-3000.png"))
        assert page.errors == []
