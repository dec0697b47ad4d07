"""The bad-input corpus: real broken files and records, generated (no binary blobs in the repository).

    python tests/data/make_bad_corpus.py OUT_DIR     # writes OUT_DIR/{records.json, images/, files/, ...}

Layout of OUT_DIR:
  images/            the image root: valid images, broken ones, a bomb, a symlink out of the root
  outside/           a valid image outside the root (the symlink's target)
  records.json       one sample per record case (bad ones and valid-but-unusual ones), in CASES order
  files/             whole files that cannot be read (syntax, encoding, shape)
  cases.json         the manifest: name, kind, file, index, expected message, level
Record cases of kind "valid" must load (converted to RGB, EXIF applied); "error" ones must be refused
with the expected words; "warning" ones are reported but do not fail a check.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

BOMB_SIDE = 9000  # 81M pixels: over mllm.data.images.MAX_PIXELS (64M), under PIL's own bomb error (178M)
GIANT_CAPTION_CHARS = 1_000_000


@dataclass
class Case:
    name: str
    kind: str  # valid | error | warning
    file: str  # relative to the corpus root
    index: int | None  # sample index in records.json (None: a whole-file case)
    expect: str  # words the message must contain ("" for valid cases)
    needs_tokenizer: bool = False  # only found when the conversation is tokenised


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def write_bomb(path: Path, side: int = BOMB_SIDE) -> None:
    """A real, valid greyscale PNG of side x side zero pixels: ~80 KB on disk, 81 MB decoded."""
    comp = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def write_images(images: Path, outside: Path) -> None:
    images.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (200, 40, 40)).save(images / "ok.png")
    Image.new("RGB", (32, 32), (40, 40, 200)).save(outside / "secret.png")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buf, format="PNG")
    (images / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buf, format="JPEG"
    )
    (images / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (images / "zero.png").write_bytes(b"")
    (images / "not_an_image.png").write_text("this is a text file with an image's name\n")
    (images / "a_directory.png").mkdir(exist_ok=True)
    write_bomb(images / "bomb.png")
    # Valid but unusual: each must load as the RGB a viewer shows.
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(images / "cmyk.jpg", quality=95)  # red in CMYK
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(images / "gray16.png")  # 16-bit grey
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(0, (0, 0, 8, 16))  # left half: index 0, transparent
    pal.save(images / "palette_alpha.png", transparency=0)
    stored = Image.new("RGB", (40, 20), (255, 255, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 20))  # red left band as stored; orientation 6 shows it on top
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    stored.save(images / "exif_rotated.jpg", exif=exif.tobytes(), quality=95)
    Image.new("LA", (16, 16), (120, 128)).save(images / "gray_alpha.png")
    link = images / "escape_link.png"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(os.path.relpath(outside / "secret.png", images), link)


def _conv(q: str = "<image>\nWhat color is it?", a: str | None = "red") -> list[dict]:
    turns = [{"from": "human", "value": q}]
    if a is not None:
        turns.append({"from": "gpt", "value": a})
    return turns


def record_cases() -> list[tuple[Case, object]]:
    """(case, record) pairs; the index is filled in by position."""

    def img(name: str, file: str, expect: str, kind: str = "error") -> tuple[Case, object]:
        return Case(name, kind, "records.json", None, expect), {
            "id": name,
            "image": file,
            "conversations": _conv(),
        }

    def rec(
        name: str, record: object, expect: str, kind: str = "error", tok: bool = False
    ) -> tuple[Case, object]:
        return Case(name, kind, "records.json", None, expect, tok), record

    return [
        img("valid_rgb", "ok.png", "", "valid"),
        img("valid_cmyk_jpeg", "cmyk.jpg", "", "valid"),
        img("valid_16bit_png", "gray16.png", "", "valid"),
        img("valid_palette_alpha", "palette_alpha.png", "", "valid"),
        img("valid_exif_rotated", "exif_rotated.jpg", "", "valid"),
        img("valid_gray_alpha", "gray_alpha.png", "", "valid"),
        rec(
            "valid_text_only", {"id": "valid_text_only", "conversations": _conv("Hello?", "Hi.")}, "", "valid"
        ),
        img("truncated_png", "truncated.png", "cannot decode image"),
        img("truncated_jpeg", "truncated.jpg", "cannot decode image"),
        img("zero_byte_file", "zero.png", "cannot decode image"),
        img("not_an_image", "not_an_image.png", "cannot decode image"),
        img(
            "decompression_bomb",
            "bomb.png",
            f"{BOMB_SIDE}x{BOMB_SIDE} = {BOMB_SIDE**2} pixels exceeds the limit",
        ),
        img("missing_image", "nope.png", "image file not found"),
        img("directory_named_png", "a_directory.png", "image file not found (it is a directory)"),
        img("escape_dotdot", "../../etc/passwd", "escapes the image root"),
        img("escape_absolute", "/etc/passwd", "escapes the image root"),
        img("escape_symlink", "escape_link.png", "escapes the image root"),
        img("image_empty_string", "", "is not a non-empty string"),
        rec(
            "image_not_a_string",
            {"id": "image_not_a_string", "image": 42, "conversations": _conv()},
            "image entry 42 is not a path string",
        ),
        rec(
            "missing_conversations",
            {"id": "missing_conversations", "image": "ok.png"},
            "missing 'conversations'",
        ),
        rec(
            "empty_conversation",
            {"id": "empty_conversation", "conversations": []},
            "'conversations' must be a non-empty list",
        ),
        rec(
            "conversations_not_a_list",
            {"id": "conversations_not_a_list", "conversations": "hi"},
            "'conversations' must be a non-empty list",
        ),
        rec(
            "unknown_role",
            {"id": "unknown_role", "conversations": [{"from": "robot", "value": "x"}]},
            "turn 0 has unknown role 'robot'",
        ),
        rec(
            "missing_role",
            {"id": "missing_role", "conversations": [{"value": "x"}]},
            "turn 0 has unknown role None",
        ),
        rec(
            "value_is_a_number",
            {
                "id": "value_is_a_number",
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 5}],
            },
            "turn 1 has no text 'value'",
        ),
        rec(
            "turn_not_an_object",
            {"id": "turn_not_an_object", "conversations": ["hello"]},
            "turn 0 is not an object",
        ),
        rec(
            "no_assistant_turn",
            {"id": "no_assistant_turn", "image": "ok.png", "conversations": _conv(a=None)},
            "no assistant turn",
        ),
        rec(
            "more_markers_than_images",
            {
                "id": "more_markers_than_images",
                "image": "ok.png",
                "conversations": _conv("<image>\n<image>\nCompare."),
            },
            "2 <image> marker(s) in the text but 1 image(s)",
        ),
        rec(
            "marker_without_image",
            {"id": "marker_without_image", "conversations": _conv()},
            "1 <image> marker(s) in the text but 0 image(s)",
        ),
        rec(
            "image_without_marker",
            {"id": "image_without_marker", "image": "ok.png", "conversations": _conv("What color?")},
            "0 <image> marker(s) in the text but 1 image(s)",
        ),
        rec("record_not_an_object", 7, "a sample must be an object"),
        rec(
            "gigantic_caption",
            {
                "id": "gigantic_caption",
                "image": "ok.png",
                "conversations": _conv(a="red " * (GIANT_CAPTION_CHARS // 4)),
            },
            "exceed max_length",
            tok=True,
        ),
        rec(
            "duplicate_id",
            {"id": "valid_rgb", "image": "ok.png", "conversations": _conv()},
            "duplicate id (also sample #0)",
            "warning",
        ),
    ]


def file_cases(files: Path) -> list[Case]:
    files.mkdir(parents=True, exist_ok=True)
    good = json.dumps([{"id": "a", "conversations": _conv("Hi?", "Hello.")}], indent=1)
    (files / "syntax_error.json").write_text('[\n  {"id": "a",\n   "conversations": [}\n]')
    (files / "truncated.json").write_text(good[: len(good) // 2])
    (files / "not_utf8.json").write_bytes(good.replace("Hello.", "H\u00e9llo.").encode("latin-1"))
    (files / "top_level_object.json").write_text('{"id": "a", "conversations": []}')
    (files / "empty_file.json").write_bytes(b"")
    (files / "trailing_comma.json").write_text('[{"id": "a", "conversations": []},\n]')
    (files / "bad_line.jsonl").write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n')
    return [
        Case(
            "json_syntax_error",
            "error",
            "files/syntax_error.json",
            None,
            "syntax_error.json:3: JSON syntax error: Expecting value (column",
        ),
        Case("json_truncated", "error", "files/truncated.json", None, "truncated.json:"),
        Case("non_utf8_text", "error", "files/not_utf8.json", None, "not UTF-8 text (byte"),
        Case(
            "top_level_object",
            "error",
            "files/top_level_object.json",
            None,
            "expected a list of samples, got dict",
        ),
        Case("empty_file", "error", "files/empty_file.json", None, "empty_file.json:1: JSON syntax error"),
        Case(
            "trailing_comma",
            "error",
            "files/trailing_comma.json",
            None,
            "trailing_comma.json:2: JSON syntax error",
        ),
        Case("jsonl_bad_line", "error", "files/bad_line.jsonl", None, "bad_line.jsonl:2: JSON syntax error"),
    ]


def make_corpus(out: str | Path) -> list[Case]:
    out = Path(out)
    write_images(out / "images", out / "outside")
    cases, records = [], []
    for i, (case, record) in enumerate(record_cases()):
        case.index = i
        cases.append(case)
        records.append(record)
    (out / "records.json").write_text(json.dumps(records, indent=1))
    cases += file_cases(out / "files")
    (out / "cases.json").write_text(json.dumps([asdict(c) for c in cases], indent=1))
    return cases


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    made = make_corpus(sys.argv[1])
    bad = sum(c.kind != "valid" for c in made)
    print(f"{sys.argv[1]}: {len(made)} cases ({bad} bad inputs, {len(made) - bad} valid-but-unusual)")
