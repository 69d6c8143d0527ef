"""Bytes to an RGB Pillow image, with every failure mapped to a stable error code.

The format is sniffed from the bytes (a declared ``Content-Type`` is never consulted) and
limited to :data:`FORMATS`, so none of Pillow's rarer, riskier decoders ever runs. Animated
formats give their first frame; EXIF orientation is applied; transparency is composited
on white; 16-bit samples are scaled, not clipped.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from producer.errors import ErrorCode, JobError, shorten

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""Pillow formats cliptag decodes; the JPEG opener also returns the multi-picture JPEGs
("MPO") many cameras write."""

MAX_ASPECT_RATIO = 100
"""Longest side over shortest side: beyond it, resizing the short side to the model's input
would blow a thin strip up to gigabytes (a 1×60000 image to 224×13 440 000)."""

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
BACKGROUND = (255, 255, 255, 255)


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    draft_size: Callable[[int, int], tuple[int, int] | None] | None = None,
) -> Image.Image:
    """Decode ``data`` into an RGB image with its EXIF orientation applied.

    Args:
        data: the encoded image.
        max_pixels: refuse images with more pixels than this (decompression bombs).
        draft_size: maps the stored (width, height) to the smallest size the decoder
            may produce, or ``None``; JPEGs are then decoded at the smallest DCT scale
            still at least that large, far cheaper for large photos.

    Raises:
        JobError: ``not_an_image``, ``too_many_pixels`` or ``decode_failed``.
    """
    image = open_image(data)
    width, height = image.size
    if width * height > max_pixels:
        raise JobError(
            ErrorCode.TOO_MANY_PIXELS,
            f"image is {width}×{height} = {width * height} pixels, over {max_pixels}",
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise JobError(
            ErrorCode.TOO_MANY_PIXELS,
            f"image is {width}×{height}, an aspect ratio over {MAX_ASPECT_RATIO}:1",
        )
    if draft_size is not None and image.format in ("JPEG", "MPO"):
        target = draft_size(width, height)
        if target is not None:
            image.draft("RGB", target)
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return to_rgb(image)
    except Exception as exc:  # Pillow raises many types for broken files
        raise JobError(
            ErrorCode.DECODE_FAILED, f"the {image.format} image could not be decoded: {shorten(str(exc), 80)}"
        ) from None


def open_image(data: bytes) -> Image.Image:
    """Identify ``data`` by its bytes and read its header (no pixels yet).

    Raises:
        JobError: ``not_an_image`` naming the first bytes, ``too_many_pixels`` for images
            past Pillow's own bomb limit, or ``decode_failed`` for a broken header.
    """
    if not data:
        raise JobError(ErrorCode.NOT_AN_IMAGE, "the data is empty")
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise JobError(
            ErrorCode.NOT_AN_IMAGE,
            f"the data is not a {'/'.join(FORMATS)} image (it starts with {shorten(data[:16])})",
        ) from None
    except Image.DecompressionBombError as exc:
        raise JobError(ErrorCode.TOO_MANY_PIXELS, shorten(str(exc))) from None
    except Exception as exc:  # a header Pillow recognized but could not parse
        raise JobError(
            ErrorCode.DECODE_FAILED, f"the image header is broken: {shorten(str(exc), 80)}"
        ) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: 16-bit gray scaled, transparency composited on white, CMYK converted."""
    if image.mode in SIXTEEN_BIT_MODES:
        samples = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        image = Image.fromarray(np.rint(samples / 257.0).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND), rgba)
    return image if image.mode == "RGB" else image.convert("RGB")
