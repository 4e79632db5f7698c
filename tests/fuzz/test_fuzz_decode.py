"""Fuzzed images through the decoder: decoded or quarantined with a reason, never a traceback
(cases: tests/fuzz/cases.py). Also the behaviours the fuzzing pinned down: animated files
give their first frame, 16-bit greyscale keeps its high byte, forged sizes are refused before
any pixel is decoded, and a damaged PNG no longer kills the process."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from PIL import Image

from pipeline.data.decode import DecodeError, DecodeSpec, decode_batch, decode_to_uint8
from tests.conftest import REPO
from tests.fuzz.cases import (
    FORGERS,
    ImageSpec,
    Mutation,
    decode_outcomes,
    encode,
    fuzz_settings,
    image_cases,
    mutate,
)

# Pillow warns about the damage it survives (corrupt EXIF, truncated tags): expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CRASHER = """
from pipeline.data.decode import DecodeSpec, decode_batch
from tests.fuzz.cases import ImageSpec, Mutation, encode, mutate
png = encode(ImageSpec("PNG", "RGB", 24, 16, seed=3))
damaged = [mutate(png, "PNG", Mutation("flip", edits=((at, 0),))) for at in range(45, 90, 3)]
batch = decode_batch(damaged, DecodeSpec(channels=3, size=8))
print(len(batch.ok) + len(batch.rejects))
"""


def test_damaged_png_does_not_kill_the_process():
    """torchvision 0.29.1's decode_png segfaulted on any libpng error (one flipped bit in
    IDAT); run apart, so a regression fails this test instead of the whole session."""
    done = subprocess.run([sys.executable, "-c", CRASHER], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "15"


@fuzz_settings(max_examples=150)
@given(case=image_cases())
def test_fuzzed_images_are_decoded_or_quarantined(case):
    (outcome,) = decode_outcomes(case)
    assert not outcome.bad, outcome.detail


@pytest.mark.parametrize("fmt", sorted(FORGERS))
@pytest.mark.parametrize("size", [(60000, 60000), (2**31 - 1, 2**31 - 1), (2**32 - 1, 2**32 - 1)])
def test_forged_huge_sizes_are_refused_before_decoding(fmt, size):
    data = mutate(encode(ImageSpec(fmt, "RGB" if fmt != "GIF" else "P", 20, 12)), fmt,
                  Mutation("forge", size=size))
    with pytest.raises(DecodeError) as info:
        decode_to_uint8(data, 3, 64_000_000)
    # 16-bit fields (JPEG, GIF) and 14-bit ones (WebP) keep the low bits: still too large;
    # a header that cannot hold the size at all fails to parse.
    assert str(info.value).startswith(("too large", "corrupt or truncated", "unsupported"))


def frames_file(fmt: str, values: tuple[int, ...]) -> bytes:
    frames = [Image.fromarray(np.full((12, 10, 3), v, np.uint8)) for v in values]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:])
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF"])
def test_animated_files_give_their_first_frame(fmt):
    pixels = decode_to_uint8(frames_file(fmt, (10, 200, 90)), 3, 64_000_000)
    assert pixels.shape == (3, 12, 10)
    assert abs(pixels.float().mean().item() - 10) <= 2


def sixteen_bit_png(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def test_sixteen_bit_png_keeps_its_high_byte_next_to_8_bit_rows():
    """Was: uint16 pixels from torchvision, clipped to 255 by the resize or, at exactly the
    model's size, a RuntimeError that failed the whole block in torch.stack."""
    values = np.random.default_rng(0).integers(0, 2**16, (16, 16))
    batch = decode_batch([sixteen_bit_png(values), encode(ImageSpec("PNG", "L", 16, 16))],
                         DecodeSpec(channels=1, size=16))
    assert batch.ok == [0, 1] and batch.pixels.dtype == torch.uint8
    assert np.array_equal(batch.pixels[0, 0].numpy(), (values >> 8).astype(np.uint8))


@pytest.mark.parametrize("fmt,mode", [("PNG", "LA"), ("PNG", "P+trns"), ("JPEG", "CMYK"),
                                      ("PNG", "1"), ("TIFF", "1"), ("TIFF", "I;16"),
                                      ("TIFF", "CMYK"), ("BMP", "P"), ("TIFF", "LA")])
@pytest.mark.parametrize("channels", [1, 3])
def test_odd_modes_decode_to_the_requested_channels(fmt, mode, channels):
    pixels = decode_to_uint8(encode(ImageSpec(fmt, mode, 9, 7)), channels, 64_000_000)
    assert pixels.shape == (channels, 7, 9) and pixels.dtype == torch.uint8
