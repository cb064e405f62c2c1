"""Decoding untrusted image bytes with bounded time and memory.

One function serves every place sharecl reads an image a user hands it (``sharecl predict``,
image folders, ``sharecl serve``'s base64 inputs), so the same file gives the same pixels
everywhere. The header is read first and the image refused before any pixel is decoded when:

- its longest side exceeds :data:`MAX_IMAGE_SIDE` pixels,
- it has more than :data:`MAX_IMAGE_PIXELS` pixels (width × height), or
- its aspect ratio (long side ÷ short side) exceeds :data:`MAX_ASPECT_RATIO` (a 16,777,216 × 1
  PNG is 49 KB, and resizing its short side to 56 pixels would ask for 939 million × 56);

only the formats in :data:`FORMATS` are opened (no PostScript, which PIL would hand to
Ghostscript, nor any other plugin); JPEGs larger than needed are decoded at reduced scale
(``Image.draft``), other formats are shrunk in two steps (``reduce``, then bilinear), and the
result is cut to ``max_side`` on its shorter side at once, so what is kept per image is small.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["ImageRefused", "ImageTooLarge", "decode_image", "MAX_IMAGE_SIDE", "MAX_IMAGE_PIXELS", "MAX_ASPECT_RATIO", "FORMATS"]

#: Longest side accepted, in pixels.
MAX_IMAGE_SIDE = 8192
#: Most pixels accepted (width × height): 16.8 million, a 16 MP photo fits.
MAX_IMAGE_PIXELS = 4096 * 4096
#: Largest long-side ÷ short-side ratio accepted.
MAX_ASPECT_RATIO = 16.0
#: PIL format names that are opened; anything else is refused unread.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")


class ImageRefused(ValueError):
    """Bytes that are not an image sharecl reads (not an image, truncated, unsupported format)."""


class ImageTooLarge(ImageRefused):
    """An image whose declared size is over the limits (refused before decoding)."""


def decode_image(source: str | Path | bytes | io.BytesIO | BinaryIO, max_side: int | None = 256, *, what: str = "image") -> np.ndarray:
    """Decode one image to RGB uint8 ``(H, W, 3)``, its shorter side cut to ``max_side`` pixels.

    Args:
        source: a file path, the file's bytes, or a binary file object.
        max_side: shorter side of the result when the image is larger (None: full size).
        what: how error messages name the input (e.g. ``inputs[3]`` or a path).

    Raises:
        ImageTooLarge: sides, pixel count or aspect ratio over the limits (module docstring).
        ImageRefused: bytes PIL cannot read as one of :data:`FORMATS`, or a truncated file.
    """
    from PIL import Image

    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp, formats=FORMATS) as im:
                w, h = im.size
                _check_size(w, h, what)
                if max_side and min(w, h) > 2 * max_side:
                    s = max_side / min(w, h)
                    im.draft("RGB", (max(1, round(w * s)), max(1, round(h * s))))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
                img = im.convert("RGB")
                if max_side and min(img.size) > max_side:
                    s = max_side / min(img.size)
                    img = img.resize((max(1, round(img.size[0] * s)), max(1, round(img.size[1] * s))), Image.Resampling.BILINEAR,
                                     reducing_gap=3.0)
                return np.asarray(img, dtype=np.uint8).copy()
    except ImageRefused:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # PIL's own, looser, pixel limit
        raise ImageTooLarge(f"{what} is too large to decode ({exc}); the limit is {MAX_IMAGE_PIXELS:,} pixels") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds on hostile bytes; all mean "not an image we read"
        raise ImageRefused(f"{what} is not an image sharecl can read ({type(exc).__name__}: {str(exc)[:120]}); "
                           f"send a {', '.join(FORMATS)} file") from exc


def _check_size(w: int, h: int, what: str) -> None:
    if w < 1 or h < 1:
        raise ImageRefused(f"{what} has an empty size {w}×{h}")
    if max(w, h) > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise ImageTooLarge(f"{what} is {w}×{h} pixels; the limits are {MAX_IMAGE_SIDE} pixels a side, "
                            f"{MAX_IMAGE_PIXELS:,} pixels and an aspect ratio of {MAX_ASPECT_RATIO:g}; send a smaller image")
