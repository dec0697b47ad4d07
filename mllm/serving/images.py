"""An `image_url` part of a chat message, as a PIL image: a data URI, or a local file under a declared root.

The server never fetches a URL: it may run where the network is closed, and a server that fetches
what a request names can be turned against the hosts beside it. Local paths are refused unless the
operator declared a root (`--image-root`), and then confined to it the way training data is
(`mllm.data.images.resolve_image`: no `..`, no symlink out). Every limit is checked before the image is
decoded: the bytes of the data URI, then the pixel count in the header (decompression bombs).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from mllm.data.images import ImageError, decode_image, resolve_image
from mllm.serving.protocol import ApiError

_DATA_URI = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*?)(?P<b64>;base64)?,(?P<data>.*)$", re.S)


@dataclass(frozen=True)
class ImageLimits:
    """What one image may weigh: its encoded bytes and its pixels; `root` enables local paths."""

    max_bytes: int = 10_000_000
    max_pixels: int = 4096 * 4096
    root: Path | None = None


def _too_big(n: int, limits: ImageLimits, where: str) -> ApiError:
    return ApiError(
        400,
        f"{where}: {n:,} bytes; this server takes images of at most {limits.max_bytes:,} bytes "
        "(mllm serve --max-image-bytes)",
        code="image_too_large",
        param=where,
    )


def from_data_uri(url: str, limits: ImageLimits, where: str) -> Image.Image:
    m = _DATA_URI.match(url)
    if m is None:
        raise ApiError(
            400, f"{where}: not a data URI (data:image/png;base64,...)", code="invalid_image", param=where
        )
    mime = m["mime"].strip().lower()
    if not mime.startswith("image/"):
        raise ApiError(
            400,
            f"{where}: a data URI of type {mime or 'text/plain'!r} is not an image",
            "invalid_image",
            where,
        )
    if not m["b64"]:
        raise ApiError(400, f"{where}: an image data URI must be base64 (;base64,)", "invalid_image", where)
    data = m["data"]
    if len(data) * 3 // 4 > limits.max_bytes + 3:  # refused before decoding a byte of it
        raise _too_big(len(data) * 3 // 4, limits, where)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{where}: the data URI is not valid base64 ({e})", "invalid_image", where) from e
    if len(raw) > limits.max_bytes:
        raise _too_big(len(raw), limits, where)
    try:
        return decode_image(raw, where, limits.max_pixels)
    except ImageError as e:
        raise ApiError(400, str(e), code="invalid_image", param=where) from e


def from_path(url: str, limits: ImageLimits, where: str) -> Image.Image:
    if limits.root is None:
        raise ApiError(
            400,
            f"{where}: local image paths are off on this server; send the image as a data URI, or start "
            "the server with --image-root DIR",
            code="invalid_image_url",
            param=where,
        )
    path = unquote(urlparse(url).path) if url.startswith("file:") else url
    root = limits.root.resolve()
    try:  # an absolute path, or one relative to the root; either way it must resolve inside the root
        resolved = resolve_image(root, path)
    except ImageError as e:
        raise ApiError(
            400,
            f"{where}: {path!r} is outside the image root {root}",
            code="image_path_outside_root",
            param=where,
        ) from e
    if not resolved.is_file():
        raise ApiError(400, f"{where}: {path!r}: no such image file under {root}", "invalid_image_url", where)
    if resolved.stat().st_size > limits.max_bytes:
        raise _too_big(resolved.stat().st_size, limits, where)
    try:
        return decode_image(resolved.read_bytes(), where, limits.max_pixels)
    except ImageError as e:
        raise ApiError(400, str(e), code="invalid_image", param=where) from e


def load_image_url(url: str, limits: ImageLimits, where: str = "image_url") -> Image.Image:
    """The image an `image_url.url` names; an `ApiError` (400) with the reason otherwise."""
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{where}: empty image URL", code="invalid_image_url", param=where)
    if url.startswith("data:"):
        return from_data_uri(url, limits, where)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https", "ftp"):
        raise ApiError(
            400,
            f"{where}: this server does not fetch URLs ({scheme}://); send the image as a data URI"
            + (" or a path under its image root" if limits.root is not None else ""),
            code="invalid_image_url",
            param=where,
        )
    if scheme not in ("", "file") and not re.match(r"^[a-zA-Z]:[\\/]", url):
        raise ApiError(400, f"{where}: unsupported image URL scheme {scheme!r}", "invalid_image_url", where)
    return from_path(url, limits, where)
