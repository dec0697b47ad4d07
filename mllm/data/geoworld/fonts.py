"""Font access and text layout for drawn labels and questions.

Pillow's built-in scalable default font is used on purpose: it ships inside Pillow, so rendering
is identical on every machine with the same Pillow version and needs no font files on disk.
"""

from __future__ import annotations

from functools import lru_cache

from PIL import ImageFont

FontT = ImageFont.FreeTypeFont | ImageFont.ImageFont


@lru_cache(maxsize=32)
def font(size: int) -> FontT:
    return ImageFont.load_default(size=size)


def label_size(width: int) -> int:
    """Font size of vertex labels and values on a figure `width` pixels wide (≥ 8 px)."""
    return max(8, round(width * 0.08))


def text_size(width: int) -> int:
    """Font size of a question drawn into a Vision Only figure."""
    return max(8, round(width * 0.05))


def line_height(size: int) -> int:
    return round(size * 1.3)


def wrap(text: str, size: int, max_width: int) -> list[str]:
    """Greedy word wrap honouring explicit newlines, measured with the real font."""
    f = font(size)
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            cand = f"{line} {word}" if line else word
            if line and f.getlength(cand) > max_width:
                lines.append(line)
                line = word
            else:
                line = cand
        lines.append(line)
    return lines
