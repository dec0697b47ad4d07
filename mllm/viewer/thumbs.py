"""Thumbnails beside the report (`thumbs/`), one per distinct image, named by the image's path.

POPE asks a few hundred images thousands of questions: each image is read and scaled once. Large
photos are scaled down (JPEG, so a COCO-sized benchmark stays a few MB); small synthetic scenes are
scaled up by a whole factor with nearest-neighbour pixels, so a 64-px shape stays a crisp shape. The
aspect ratio is kept, so boxes drawn in the image's own pixel coordinates land where they belong.
Each thumbnail's pixel size goes into the page too: an `<img>` with its width and height holds its
place before it loads, so lazily loaded images never move the pager under a reader's (or a test's)
click.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image

from mllm.data.images import ImageError, load_image

THUMB_SIDE = 192


def thumb_name(image: Path) -> str:
    return hashlib.sha1(str(Path(image).resolve()).encode()).hexdigest()[:20] + ".jpg"


def make_thumb(image: Path, out: Path, side: int = THUMB_SIDE) -> tuple[int, int] | None:
    """Write `out` from `image` unless it exists; its (width, height), or None when the image cannot
    be read."""
    if out.is_file():
        try:
            with Image.open(out) as done:
                return done.size
        except OSError:
            pass  # a thumbnail cut short by a crash: make it again
    try:
        im = load_image(image)
    except ImageError:
        return None
    longest = max(im.size)
    if longest > side:
        im.thumbnail((side, side), Image.LANCZOS)
    elif longest * 2 <= side:
        k = side // longest
        im = im.resize((im.width * k, im.height * k), Image.NEAREST)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    im.save(tmp, format="JPEG", quality=90, subsampling=0)
    tmp.replace(out)
    return im.size


class Thumbnails:
    """Thumbnails under `out_dir/thumbs`, made on first request; `get` gives the path relative to
    `out_dir` (what the HTML links), or None for an image that cannot be read; `size` gives the
    thumbnail's (width, height)."""

    def __init__(self, out_dir: Path, side: int = THUMB_SIDE) -> None:
        self.out_dir, self.side = Path(out_dir), side
        self.made: dict[Path, tuple[str, tuple[int, int]] | None] = {}

    def _made(self, image: Path | None) -> tuple[str, tuple[int, int]] | None:
        if image is None:
            return None
        image = Path(image)
        if image not in self.made:
            rel = f"thumbs/{thumb_name(image)}"
            size = make_thumb(image, self.out_dir / rel, self.side)
            self.made[image] = (rel, size) if size is not None else None
        return self.made[image]

    def get(self, image: Path | None) -> str | None:
        made = self._made(image)
        return made[0] if made is not None else None

    def size(self, image: Path | None) -> tuple[int, int] | None:
        made = self._made(image)
        return made[1] if made is not None else None
