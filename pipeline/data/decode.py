"""Decode encoded image bytes to model-ready arrays, one row at a time, never failing a batch.

Decoding uses torchvision's native decoders for JPEG, WebP and GIF and Pillow for everything
else (PNG, BMP, TIFF, ...). Every failure is returned as a reason string, so a caller can
quarantine the row with its id and go on (DESIGN §3, RAY_NOTES: Data). Animated GIF, PNG and
WebP files give their first frame; 16-bit greyscale keeps its 8 most significant bits.

This module imports neither Ray nor Ray Data: it is plain numpy/torch and tested as such.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, UnidentifiedImageError

warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a reject, not grey padding
Image.MAX_IMAGE_PIXELS = None  # we enforce our own limit before decoding

# Not PNG: torchvision 0.29.1's decode_png kills the process (SIGSEGV) on any libpng error,
# e.g. one flipped bit in an IDAT chunk (found by tests/fuzz). Pillow decodes a 256-px PNG as
# fast and a 28-px one ~20% slower here (~15 us: the header is parsed twice).
_TORCHVISION_FORMATS = {"JPEG", "WEBP", "GIF"}
_SIXTEEN_BIT_GREY = {"I;16", "I;16B", "I;16L", "I;16N"}


class DecodeError(ValueError):
    """The bytes are not a usable image; ``str(exc)`` is the quarantine reason."""


@dataclass(frozen=True)
class DecodeSpec:
    """What the model wants: ``channels`` x ``size`` x ``size``, normalised with mean/std."""

    channels: int = 3
    size: int = 224
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    max_pixels: int = 64_000_000


def probe(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """Read only the header: ``(format, width, height)``; raise DecodeError if unusable."""
    if len(data) == 0:
        raise DecodeError("empty: zero-length image data")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height) = img.format or "?", img.size
    except UnidentifiedImageError as exc:
        raise DecodeError("unsupported format: not a recognised image") from exc
    except Exception as exc:  # noqa: BLE001 - any parser failure is a reject
        raise DecodeError(f"corrupt or truncated header: {type(exc).__name__}: {exc}") from exc
    if width <= 0 or height <= 0:
        raise DecodeError(f"invalid size: {width}x{height}")
    if width * height > max_pixels:
        raise DecodeError(f"too large: {width}x{height} exceeds max_pixels={max_pixels}")
    return fmt, width, height


def decode_to_uint8(data: bytes, channels: int, max_pixels: int) -> torch.Tensor:
    """Encoded bytes -> uint8 tensor (channels, H, W), original size.

    Greyscale, palette, CMYK and alpha images are converted to ``channels`` (1 or 3).
    """
    fmt, _, _ = probe(data, max_pixels)
    if fmt == "JPEG" and not _has_jpeg_end(data):
        # libjpeg pads a cut-off scan with grey instead of failing; a complete file ends
        # with the EOI marker (0xFFD9), give or take some trailing padding.
        raise DecodeError("corrupt or truncated: JPEG has no end-of-image marker")
    if fmt in _TORCHVISION_FORMATS:
        # imported here: torchvision costs a process ~3 s, and most that import this module
        # (train workers, the driver) never decode
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_image as tv_decode_image

        mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        try:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            image = tv_decode_image(buf, mode=mode)
            image = image[0] if image.ndim == 4 else image  # animated GIF: first frame
            return to_channels(image, channels)
        except RuntimeError:
            pass  # e.g. CMYK/progressive corner cases: let Pillow decide
    return _decode_pillow(data, channels)


def _has_jpeg_end(data: bytes, slack: int = 4096) -> bool:
    eoi = data.rfind(b"\xff\xd9")
    return eoi >= 0 and eoi >= len(data) - slack


def to_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (c, H, W) with c in {1, 2, 3, 4} -> (channels, H, W); alpha is dropped.

    Some decoders ignore the requested mode (e.g. GIF), so the count is enforced here, with
    ITU-R 601 luma weights for RGB -> grey, as Pillow's ``convert("L")`` uses.
    """
    c = image.shape[0]
    if c in (2, 4):
        image, c = image[: c - 1], c - 1
    if c == channels:
        return image
    if channels == 3:
        return image.expand(3, -1, -1).contiguous()
    weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    return (image.float() * weights).sum(0, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)


def _decode_pillow(data: bytes, channels: int) -> torch.Tensor:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                rgb = _eight_bit(img).convert("L" if channels == 1 else "RGB")
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt data of any kind
        raise DecodeError(f"corrupt or truncated: {type(exc).__name__}: {exc}") from exc
    array = np.asarray(rgb, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.array(array, copy=True))


def _eight_bit(img: Image.Image) -> Image.Image:
    """16-bit greyscale (``I;16*``) -> ``L`` with the high byte of each value, as libpng's
    ``png_set_strip_16``; Pillow's own conversion would clip every value above 255 to white."""
    if img.mode not in _SIXTEEN_BIT_GREY:
        return img
    values = np.asarray(img).astype(np.uint16)  # native byte order, whatever the mode's
    return Image.fromarray((values >> 8).astype(np.uint8), mode="L")


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, size, size): shorter side to ``size``, then centre crop."""
    _, h, w = image.shape
    if (h, w) == (size, size):
        return image
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    out = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear",
                        antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    out = out[:, top : top + size, left : left + size]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def normalize(pixels: torch.Tensor, spec: DecodeSpec) -> torch.Tensor:
    """uint8 (..., C, H, W) -> float32 (x/255 - mean)/std."""
    c = pixels.shape[-3]
    mean = torch.tensor(spec.mean, dtype=torch.float32).expand(c).view(c, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).expand(c).view(c, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


@dataclass
class DecodedBatch:
    """Result of :func:`decode_batch`.

    ``pixels``: uint8 (n_ok, C, size, size); ``ok``: indices of the decoded input rows;
    ``rejects``: (input row index, reason) for every row that failed.
    """

    pixels: torch.Tensor
    ok: list[int]
    rejects: list[tuple[int, str]]


def decode_batch(images: Sequence[bytes | None], spec: DecodeSpec) -> DecodedBatch:
    """Decode and resize every row; a bad row becomes a reject, never an exception."""
    out, ok, rejects = [], [], []
    for i, data in enumerate(images):
        try:
            if data is None:
                raise DecodeError("empty: null image")
            img = decode_to_uint8(bytes(data), spec.channels, spec.max_pixels)
            out.append(resize(img, spec.size))
            ok.append(i)
        except DecodeError as exc:
            rejects.append((i, str(exc)))
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not kill the block
            rejects.append((i, f"decode failed: {type(exc).__name__}: {exc}"))
    shape = (0, spec.channels, spec.size, spec.size)
    pixels = torch.stack(out) if out else torch.empty(shape, dtype=torch.uint8)
    return DecodedBatch(pixels, ok, rejects)
