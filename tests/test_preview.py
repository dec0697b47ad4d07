"""`mllm synth --preview N` and `mllm show WORLD`: contact sheets of what a world holds."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mllm.cli import main
from mllm.data.geoworld.preview import mmvp_sheet, scene_sheet


def test_synth_preview_and_show(tmp_path, capsys):
    world = tmp_path / "w"
    args = ["synth", "--out", str(world), "--n", "8", "--seed", "2", "--preview", "5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"preview: {world / 'preview.png'}" in out and f"preview: {world / 'preview_mmvp.png'}" in out
    sheet, pairs = Image.open(world / "preview.png"), Image.open(world / "preview_mmvp.png")
    assert sheet.width > 1000 and sheet.height > 2 * 192  # 5 scenes, 3 a row: two rows of 192-px scenes
    assert pairs.height > 4 * 144  # 8 patterns, 2 pairs a row
    assert main(["show", str(world), "--n", "2", "--out", str(tmp_path / "s" / "two.png")]) == 0
    assert (tmp_path / "s" / "two.png").is_file() and (tmp_path / "s" / "two_mmvp.png").is_file()
    assert Image.open(tmp_path / "s" / "two.png").height < sheet.height


def test_sheets_show_the_worlds_own_text(tmp_path, monkeypatch):
    """Every caption, QA turn and pattern drawn is the one on disk (drawn text recorded, not OCR'd)."""
    from mllm.data.geoworld import preview as P
    from mllm.data.geoworld import write_world

    world = tmp_path / "w"
    write_world(world, seed=3, n=3, mmvp_pairs=8, pope_questions=6, refcoco_n=2, mathverse_problems=1)
    drawn: list[str] = []
    real = P._draw_lines
    monkeypatch.setattr(
        P, "_draw_lines", lambda d, x, y, lines: drawn.extend(t for t, _, _ in lines) or real(d, x, y, lines)
    )
    scene_sheet(world, n=3)
    text = " ".join(drawn)  # wrapped lines, joined again: the paragraphs as written
    for row in (json.loads(ln) for ln in (world / "captions.jsonl").read_text().splitlines()):
        assert row["long"] in text and f"#{row['id']}" in drawn
    assert sum(t.startswith("Q: ") for t in drawn) >= 3
    drawn.clear()
    mmvp_sheet(world)
    heads = [t for t in drawn if t.startswith("pair ")]
    assert len(heads) == 8 and {h.split("differs in ")[1] for h in heads} == set(
        json.loads((world / "mmvp" / "patterns.json").read_text()).values()
    )


def test_show_refuses_a_folder_that_is_not_a_world(tmp_path):
    with pytest.raises(FileNotFoundError):
        scene_sheet(tmp_path)
    assert main(["show", str(tmp_path)]) == 2
