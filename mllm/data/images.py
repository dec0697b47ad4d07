"""Opening images from a declared root, safely: confined paths, a pixel limit, RGB out."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

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


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode fully (so truncation fails here, not later in a worker) and convert to RGB."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"{path}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
            im.load()
            return im.convert("RGB")
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot decode image: {e}") from e
