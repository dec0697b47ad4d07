"""Contact sheets of a written world: look at the data before training on it.

`scene_sheet`: N training scenes, each with its long caption and a few of its QA turns, as they are in
`captions.jsonl` and `instruct.json` (the text a model learns from, beside the pixels it describes).
`mmvp_sheet`: MMVP-style pairs side by side, each row naming the one pattern the two scenes differ in,
the question and both answers. Both read only the files `write_world` wrote, so a sheet shows exactly
what is on disk; images are scaled up by whole pixels (nearest) so small shapes stay crisp.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from .files import read_jsonl
from .fonts import font, line_height, wrap

INK = (20, 24, 32)
MUTED = (95, 105, 120)
ACCENT = (40, 90, 200)
PAPER = (255, 255, 255)
GAP = 12


def _scaled(path: Path, side: int) -> Image.Image:
    """The image scaled up by a whole factor towards `side`, in a thin frame (scenes are drawn on white)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        k = max(1, side // max(im.size))
        im = im.resize((im.width * k, im.height * k), Image.NEAREST) if k > 1 else im.copy()
    return ImageOps.expand(im, border=1, fill=(200, 205, 214))


def _answer(letter: str, options: str) -> str:
    """ "(b)" with its option's text from "(a) down (b) up": "(b) up"."""
    texts = dict(re.findall(r"\((\w)\)\s*([^()]*)", options))
    key = letter.strip().strip("()")
    return f"({key}) {texts[key].strip()}" if key in texts else letter


def _text_block(
    lines: list[tuple[str, tuple[int, int, int], int]], width: int
) -> list[tuple[str, tuple, int]]:
    """(text, colour, size) paragraphs -> wrapped lines, each with its colour and size."""
    out = []
    for text, colour, size in lines:
        out.extend((ln, colour, size) for ln in wrap(text, size, width))
    return out


def _draw_lines(draw: ImageDraw.ImageDraw, x: int, y: int, lines: list[tuple[str, tuple, int]]) -> int:
    for text, colour, size in lines:
        draw.text((x, y), text, fill=colour, font=font(size))
        y += line_height(size)
    return y


def _height(lines: list[tuple[str, tuple, int]]) -> int:
    return sum(line_height(size) for _, _, size in lines)


def _grid(cells: list[tuple[Image.Image, list]], cols: int, text_w: int, title: str) -> Image.Image:
    """Cells of (picture, text lines) laid out `cols` wide, each picture with its text to its right."""
    pic_w = max(im.width for im, _ in cells)
    cell_w = pic_w + GAP + text_w
    heights = [max(im.height, _height(lines)) for im, lines in cells]
    rows = [heights[i : i + cols] for i in range(0, len(cells), cols)]
    head = line_height(20) + GAP
    total_h = head + sum(max(r) + 2 * GAP for r in rows) + GAP
    sheet = Image.new("RGB", (GAP + cols * (cell_w + 2 * GAP), total_h), PAPER)
    draw = ImageDraw.Draw(sheet)
    draw.text((GAP, GAP), title, fill=INK, font=font(20))
    y = head + GAP
    for r, row_heights in enumerate(rows):
        for c in range(len(row_heights)):
            im, lines = cells[r * cols + c]
            x = GAP + c * (cell_w + 2 * GAP)
            sheet.paste(im, (x, y))
            _draw_lines(draw, x + pic_w + GAP, y, lines)
        y += max(row_heights) + 2 * GAP
        draw.line((GAP, y - GAP, sheet.width - GAP, y - GAP), fill=(225, 228, 234))
    return sheet


def scene_sheet(world: str | Path, n: int = 12, qa: int = 3, cols: int = 3, side: int = 192) -> Image.Image:
    """The first `n` training scenes of `world` with their long captions and up to `qa` QA turns each."""
    world = Path(world)
    captions = read_jsonl(world / "captions.jsonl")[:n]
    if not captions:
        raise FileNotFoundError(f"{world}/captions.jsonl: no scenes (is {world} a GeoWorld folder?)")
    instruct = {r["id"]: r for r in json.loads((world / "instruct.json").read_text(encoding="utf-8"))}
    cells = []
    for row in captions:
        lines = [(f"#{row['id']}", ACCENT, 14), (row["long"], INK, 13)]
        turns = instruct.get(row["id"], {}).get("conversations", [])
        for q, a in list(zip(turns[::2], turns[1::2]))[:qa]:
            question = q["value"].replace("<image>\n", "").replace("\n<image>", "").strip()
            lines.append((f"Q: {question}", MUTED, 12))
            lines.append((f"A: {a['value']}", INK, 12))
        cells.append((_scaled(world / row["image"], side), _text_block(lines, 300)))
    title = f"GeoWorld {world.name}: {len(cells)} training scenes, long caption and QA"
    return _grid(cells, cols, 300, title)


def mmvp_sheet(world: str | Path, per_pattern: int = 1, side: int = 144) -> Image.Image:
    """MMVP-style pairs (the first `per_pattern` of every pattern), each row: scene A, scene B, the pattern
    they differ in, the question and each scene's answer."""
    root = Path(world) / "mmvp"
    with open(root / "Questions.csv", newline="", encoding="utf-8") as f:
        rows = {r["Index"]: r for r in csv.DictReader(f)}
    patterns = json.loads((root / "patterns.json").read_text(encoding="utf-8"))
    shown: dict[str, int] = {}
    cells = []
    for k in range(1, len(rows), 2):
        a, b = rows.get(str(k)), rows.get(str(k + 1))
        pattern = patterns.get(str(k), "?")
        if a is None or b is None or shown.get(pattern, 0) >= per_pattern:
            continue
        shown[pattern] = shown.get(pattern, 0) + 1
        ims = [_scaled(root / "MMVP Images" / f"{i}.jpg", side) for i in (k, k + 1)]
        pair = Image.new("RGB", (ims[0].width + GAP // 2 + ims[1].width, max(im.height for im in ims)), PAPER)
        pair.paste(ims[0], (0, 0))
        pair.paste(ims[1], (ims[0].width + GAP // 2, 0))
        lines = [
            (f"pair {(k + 1) // 2}: differs in {pattern}", ACCENT, 15),
            (a["Question"], INK, 13),
            (a["Options"], MUTED, 12),
            (f"left: {_answer(a['Correct Answer'], a['Options'])}", INK, 13),
            (f"right: {_answer(b['Correct Answer'], b['Options'])}", INK, 13),
        ]
        cells.append((pair, _text_block(lines, 280)))
    if not cells:
        raise FileNotFoundError(f"{root}: no MMVP pairs")
    return _grid(cells, 2, 280, f"GeoWorld {Path(world).name}: MMVP-style pairs, one visual pattern apart")


def write_previews(world: str | Path, n: int = 12, out: str | Path | None = None) -> list[Path]:
    """`scene_sheet` and `mmvp_sheet` as PNGs: `out` (default WORLD/preview.png) and `out` + `_mmvp`."""
    world = Path(world)
    out = Path(out) if out is not None else world / "preview.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    written = [out]
    scene_sheet(world, n).save(out)
    if (world / "mmvp" / "Questions.csv").is_file():
        pairs = out.with_name(out.stem + "_mmvp.png")
        mmvp_sheet(world).save(pairs)
        written.append(pairs)
    return written
