"""Decoding real encoded bytes of every supported format, and refusing hostile ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from producer.errors import ErrorCode, JobError
from tests.images import (
    HTML_PAGE,
    animated_gif,
    encode,
    exif_rotated_jpeg,
    halves,
    png_bomb,
    sixteen_bit_png,
)
from worker.decode import decode_image

SAMPLES = Path(__file__).resolve().parent.parent / "worker" / "samples"
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
LIMIT = 64_000_000


def decoded(data: bytes, **options: object) -> Image.Image:
    image = decode_image(data, max_pixels=LIMIT, **options)  # type: ignore[arg-type]
    assert image.mode == "RGB"
    return image


def refused(data: bytes, max_pixels: int = LIMIT) -> JobError:
    with pytest.raises(JobError) as raised:
        decode_image(data, max_pixels=max_pixels)
    assert not raised.value.retryable
    return raised.value


def close_to(pixel: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 8) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


@pytest.mark.parametrize(
    ("fmt", "options"), [("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {})]
)
def test_lossless_formats_decode_exactly(fmt, options):
    image = halves(20, 10, RED, BLUE)
    assert np.array_equal(np.asarray(decoded(encode(image, fmt, **options))), np.asarray(image))


def test_jpeg_and_its_draft_decode():
    data = encode(Image.new("RGB", (800, 600), RED), "JPEG")
    assert close_to(decoded(data).getpixel((400, 300)), RED)
    small = decoded(data, draft_size=lambda w, h: (100, 75))
    assert small.size < (800, 600) and small.size >= (100, 75)


def test_exif_orientation_is_applied():
    image = decoded(exif_rotated_jpeg(halves(40, 20, RED, BLUE), orientation=6))
    assert image.size == (20, 40)
    assert close_to(image.getpixel((10, 2)), RED, 40)
    assert close_to(image.getpixel((10, 37)), BLUE, 40)


def test_gif_gives_its_first_frame():
    assert decoded(animated_gif([RED, BLUE])).getpixel((8, 8)) == RED


@pytest.mark.parametrize(
    ("image", "fmt", "expected"),
    [
        (Image.new("L", (4, 4), 77), "PNG", (77, 77, 77)),
        (Image.new("1", (4, 4), 1), "PNG", WHITE),
        (Image.new("RGB", (4, 4), RED).convert("P"), "PNG", RED),
        (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", RED),
        (Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "TIFF", WHITE),
    ],
)
def test_modes_convert_to_the_right_colour(image, fmt, expected):
    assert close_to(decoded(encode(image, fmt)).getpixel((2, 2)), expected)


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (32896, 128), (65535, 255)])
def test_sixteen_bit_samples_are_scaled_not_clipped(value, expected):
    assert decoded(sixteen_bit_png(value)).getpixel((3, 3)) == (expected,) * 3


@pytest.mark.parametrize(
    ("image", "fmt", "options"),
    [
        (Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "PNG", {}),
        (Image.new("LA", (4, 4), (0, 0)), "PNG", {}),
        (Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "WEBP", {"lossless": True}),
    ],
)
def test_transparent_pixels_become_white(image, fmt, options):
    assert decoded(encode(image, fmt, **options)).getpixel((1, 1)) == WHITE


def test_half_transparent_pixels_are_composited_on_white():
    assert close_to(
        decoded(encode(Image.new("RGBA", (4, 4), (0, 0, 255, 128)), "PNG")).getpixel((0, 0)),
        (127, 127, 255),
        1,
    )


def test_palette_transparency_becomes_white():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    assert decoded(encode(palette, "GIF", transparency=0)).getpixel((0, 0)) == WHITE


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "JPEG", "BMP"])
def test_one_pixel_images_decode(fmt):
    assert decoded(encode(Image.new("RGB", (1, 1), RED), fmt)).size == (1, 1)


def test_content_is_sniffed_not_named():
    assert refused(HTML_PAGE).code is ErrorCode.NOT_AN_IMAGE
    assert "<!DOCTYPE" in refused(HTML_PAGE).message
    assert refused(b"").code is ErrorCode.NOT_AN_IMAGE
    assert refused(b"%!PS-Adobe-3.0 EPSF-3.0\n").code is ErrorCode.NOT_AN_IMAGE
    assert refused(encode(Image.new("RGB", (4, 4)), "ICO")).code is ErrorCode.NOT_AN_IMAGE


def test_truncated_jpeg_is_refused():
    data = (SAMPLES / "cat.jpg").read_bytes()
    assert refused(data[: len(data) // 2]).code is ErrorCode.DECODE_FAILED


def test_decompression_bomb_is_refused_before_decoding():
    bomb = png_bomb(8192, 8192)
    assert len(bomb) < 100_000
    error = refused(bomb)
    assert error.code is ErrorCode.TOO_MANY_PIXELS
    assert "8192×8192" in error.message
    assert refused(png_bomb(40_000, 40_000)).code is ErrorCode.TOO_MANY_PIXELS


def test_thin_strip_is_refused():
    error = refused(encode(Image.new("L", (1, 5000)), "PNG"))
    assert error.code is ErrorCode.TOO_MANY_PIXELS
    assert "aspect ratio" in error.message
