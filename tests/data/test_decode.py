"""Per-row decoding: every accepted kind decodes, every bad kind is a reason, never a raise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.decode import DecodeError, DecodeSpec, decode_batch, decode_to_uint8, normalize
from tests.images import bad_images, encode, good_images, rgb


@pytest.mark.parametrize("name", sorted(good_images()))
@pytest.mark.parametrize("channels", [1, 3])
def test_good_kinds_decode_to_requested_channels(name, channels):
    image = decode_to_uint8(good_images()[name], channels, 10**8)
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == channels


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_bad_kinds_raise_decode_error_with_reason(name):
    data, word = bad_images()[name]
    with pytest.raises(DecodeError, match=word):
        decode_to_uint8(data, 3, 10**8)


def test_png_pixels_are_exact():
    array = rgb(11)
    image = decode_to_uint8(encode(array, "PNG"), 3, 10**8)
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), array)


def test_mixed_batch_keeps_good_rows_and_reports_each_bad_one():
    good, bad = good_images(), bad_images()
    rows = list(good.values()) + [b for b, _ in bad.values()] + [None]
    spec = DecodeSpec(channels=3, size=24)
    out = decode_batch(rows, spec)
    assert out.ok == list(range(len(good)))
    assert out.pixels.shape == (len(good), 3, 24, 24) and out.pixels.dtype == torch.uint8
    reasons = dict(out.rejects)
    assert sorted(reasons) == list(range(len(good), len(rows)))
    for i, (_, word) in enumerate(bad.values(), start=len(good)):
        assert word in reasons[i]
    assert "empty" in reasons[len(rows) - 1]


def test_resize_shorter_side_then_center_crop():
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, 20:40] = 255  # the centre third is white
    out = decode_batch([encode(wide, "PNG")], DecodeSpec(channels=3, size=10)).pixels[0]
    assert out.shape == (3, 10, 10)
    assert out.float().mean() > 200  # the crop kept the white centre


def test_normalize_per_channel():
    pixels = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(pixels, DecodeSpec(channels=3, mean=(0.5, 0.0, 1.0), std=(0.5, 1.0, 0.5)))
    assert out.dtype == torch.float32
    assert torch.allclose(out[:, 0], torch.tensor(1.0))
    assert torch.allclose(out[:, 1], torch.tensor(1.0))
    assert torch.allclose(out[:, 2], torch.tensor(0.0))
