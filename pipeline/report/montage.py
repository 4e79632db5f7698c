"""Montage sprites: one small image per cluster, embedded in the report as a data URI.

Row 1 holds the images nearest the centroid, row 2 random members. One sprite per cluster
(instead of one ``<img>`` per thumbnail) keeps a k=1000 report at a few megabytes.
"""

from __future__ import annotations

import base64
import io

from PIL import Image, ImageDraw

GAP = 2
BACKGROUND = (255, 255, 255)


def thumbnail(data: bytes, px: int) -> Image.Image:
    """Decode ``data`` into an RGB ``px`` x ``px`` tile (aspect kept, padded); a grey tile
    with a cross when it cannot be decoded."""
    tile = Image.new("RGB", (px, px), BACKGROUND)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.thumbnail((px, px), Image.Resampling.BILINEAR, reducing_gap=2.0)
            small = img.convert("RGB")
            if max(small.size) < px:  # tiny inputs (8x8 digits): scale up, keep pixels crisp
                scale = px / max(small.size)
                small = small.resize((max(1, round(small.width * scale)),
                                      max(1, round(small.height * scale))),
                                     Image.Resampling.NEAREST)
    except (OSError, ValueError, Image.DecompressionBombError):
        draw = ImageDraw.Draw(tile)
        draw.rectangle((0, 0, px - 1, px - 1), fill=(200, 200, 200))
        draw.line((0, 0, px, px), fill=(120, 120, 120))
        draw.line((0, px, px, 0), fill=(120, 120, 120))
        return tile
    tile.paste(small, ((px - small.width) // 2, (px - small.height) // 2))
    return tile


def montage(rows: list[list[bytes]], px: int) -> bytes:
    """Encoded JPEG of ``rows`` of images as a grid of ``px`` tiles (empty rows skipped)."""
    rows = [r for r in rows if r]
    cols = max((len(r) for r in rows), default=1)
    width = cols * px + (cols + 1) * GAP
    height = max(1, len(rows)) * px + (max(1, len(rows)) + 1) * GAP
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    for y, row in enumerate(rows):
        for x, data in enumerate(row):
            sheet.paste(thumbnail(data, px), (GAP + x * (px + GAP), GAP + y * (px + GAP)))
    buf = io.BytesIO()
    sheet.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
