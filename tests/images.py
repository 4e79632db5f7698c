"""Test images made on the fly: every good format we accept and every kind of bad input."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(array: np.ndarray, fmt: str, mode: str | None = None, **kw) -> bytes:
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def good_images() -> dict[str, bytes]:
    """One of every accepted kind: formats, greyscale, CMYK, alpha, odd sizes."""
    grey = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    return {
        "rgb.jpg": encode(rgb(0), "JPEG", quality=95),
        "grey.png": encode(grey, "PNG"),
        "cmyk.jpg": encode(rgb(2), "JPEG", mode="CMYK"),
        "alpha.png": encode(rgb(3), "PNG", mode="RGBA"),
        "palette.gif": encode(rgb(4), "GIF", mode="P"),
        "photo.webp": encode(rgb(5), "WEBP"),
        "bitmap.bmp": encode(rgb(6), "BMP"),
        "scan.tiff": encode(rgb(7), "TIFF"),
        "wide.png": encode(rgb(8, 64)[:20], "PNG"),
    }


def huge_png_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG signature + IHDR that claims an absurd size (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))


def bad_images() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, a word the reject reason must contain)."""
    jpeg = encode(rgb(9), "JPEG")
    big = encode(rgb(12, 256), "JPEG", quality=95)
    return {
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated_scan.jpg": (big[: int(len(big) * 0.6)], "truncated"),
        "random.jpg": (np.random.default_rng(10).bytes(3000), "unsupported format"),
        "empty.png": (b"", "empty"),
        "text.png": (b"this is not an image at all\n" * 10, "unsupported format"),
        "bomb.png": (huge_png_header(), "too large"),
    }
