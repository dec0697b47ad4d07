"""Opening images from a declared root, safely: confined paths, a pixel limit, RGB out."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Over this many pixels an image is refused before decoding (decompression bombs). 8k x 8k.
MAX_PIXELS = 64_000_000


class ImageError(ValueError):
    """An image that cannot be used, naming the file and why."""


def resolve_image(root: str | Path | None, rel: str) -> Path:
    """`rel` under `root`, refusing paths that escape it (`../../etc/passwd`, absolute paths)."""
    if not isinstance(rel, str) or not rel:
        raise ImageError(f"image path {rel!r} is not a non-empty string")
    base = Path(root).resolve() if root is not None else Path.cwd().resolve()
    path = (base / rel).resolve()
    if path != base and base not in path.parents:
        raise ImageError(f"image path {rel!r} escapes the image root {base}")
    return path


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB as a camera would show it: EXIF orientation applied, 16-bit and float greys scaled to 8 bits
    (PIL's own convert clips them, turning a 16-bit scan white), palette transparency via RGBA."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.int64)
        im = Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.nan_to_num(np.asarray(im)), 0, 255).astype(np.uint8), "L")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode fully (so truncation fails here, not later in a worker) and convert to RGB."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found" + (" (it is a directory)" if path.is_dir() else ""))
    return _decode(path, str(path), max_pixels)


def decode_image(data: bytes, name: str = "image", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """`load_image` for bytes already in memory (an upload, a data URI): the same pixel limit checked before
    decoding, the same full decode and RGB conversion, errors naming `name`."""
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(source: Path | io.BytesIO, name: str, max_pixels: int) -> Image.Image:
    """The pixel limit read from the header before decoding, then a full decode to RGB; errors name `name`."""
    try:
        with Image.open(source) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
            im.load()
            return to_rgb(im)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: cannot decode image: {e}") from e
