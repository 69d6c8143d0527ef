"""Encoded test images, well-formed and hostile, built in memory."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    """``image`` saved as ``fmt`` (a Pillow format name)."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def halves(width: int, height: int, left: tuple[int, int, int], right: tuple[int, int, int]) -> Image.Image:
    """An RGB image whose left half is ``left`` and right half ``right`` (orientation shows)."""
    image = Image.new("RGB", (width, height), right)
    image.paste(left, (0, 0, width // 2, height))
    return image


def exif_rotated_jpeg(image: Image.Image, orientation: int = 6) -> bytes:
    """``image`` as a JPEG whose EXIF says to rotate it for display (6: 90° clockwise)."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return encode(image, "JPEG", quality=95, exif=exif)


def animated_gif(colors: list[tuple[int, int, int]], size: tuple[int, int] = (16, 16)) -> bytes:
    """A looping GIF with one frame per colour."""
    frames = [Image.new("RGB", size, color) for color in colors]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def sixteen_bit_png(value: int, size: tuple[int, int] = (16, 16)) -> bytes:
    """A 16-bit grayscale PNG filled with ``value`` (0…65535)."""
    return encode(Image.fromarray(np.full(size[::-1], value, dtype=np.uint16)), "PNG")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of ``width × height`` black pixels: kilobytes that decode to far more."""
    row = b"\x00" + bytes((width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


HTML_PAGE = b"<!DOCTYPE html><html><body><h1>Not Found</h1></body></html>"
