"""Bytes to an RGB Pillow image, with every failure mapped to a stable error code."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

from PIL import Image, ImageOps, UnidentifiedImageError

from producer.errors import ErrorCode, JobError


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
    """
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise JobError(ErrorCode.NOT_AN_IMAGE, "the data is not an image format cliptag reads") from None
    width, height = image.size
    if width * height > max_pixels:
        raise JobError(
            ErrorCode.TOO_MANY_PIXELS,
            f"image is {width}×{height} = {width * height} pixels, over {max_pixels}",
        )
    if draft_size is not None and image.format == "JPEG":
        target = draft_size(width, height)
        if target is not None:
            image.draft("RGB", target)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning) as exc:
        raise JobError(ErrorCode.DECODE_FAILED, f"the image could not be decoded: {exc}") from None
