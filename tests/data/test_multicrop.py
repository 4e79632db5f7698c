"""Multi-crop views (no Ray): shapes and order of the crop groups, determinism under a
seeded generator, the crop's geometry, and the photometric steps on colour and greyscale."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.multicrop import (
    CropGroup,
    MultiCropSpec,
    colour_jitter,
    multi_crop,
    random_grey,
    resized_crops,
)

SWAV = (CropGroup(2, 28, (0.2, 1.0)), CropGroup(4, 18, (0.08, 0.4)))


def images(n: int, channels: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Normalised (mean 0.5, std 0.5) random images (n, C, size, size) in [-1, 1]."""
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) \
        * 2 - 1


@pytest.mark.parametrize("channels", [1, 3])
def test_groups_have_the_swav_shapes_and_stay_in_the_pixel_range(channels):
    spec = MultiCropSpec(SWAV, flip=channels == 3)
    views = multi_crop(images(5, channels), spec, torch.Generator().manual_seed(0))
    assert [v.shape for v in views] == [(10, channels, 28, 28), (20, channels, 18, 18)]
    assert all(v.dtype == torch.float32 for v in views) and spec.views == 6
    for v in views:
        assert v.min() >= -1 - 1e-6 and v.max() <= 1 + 1e-6  # [0, 1] pixels, normalised


def test_a_seed_gives_the_same_views_and_another_seed_others():
    x = images(4, 3)
    spec = MultiCropSpec(SWAV)
    a = multi_crop(x, spec, torch.Generator().manual_seed(7))
    b = multi_crop(x, spec, torch.Generator().manual_seed(7))
    c = multi_crop(x, spec, torch.Generator().manual_seed(8))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.allclose(a[0], c[0])


def test_the_global_generator_seeded_gives_the_same_views():
    x, spec = images(3, 1), MultiCropSpec(SWAV, flip=False)
    torch.manual_seed(3)
    a = multi_crop(x, spec)
    torch.manual_seed(3)
    assert all(torch.equal(u, v) for u, v in zip(a, multi_crop(x, spec), strict=True))


def test_views_are_crop_major_each_from_its_own_image():
    """Row j·n + i of a group is a view of image i: with whole-image crops and no
    photometric change, every view of image i is image i."""
    x = images(3, 1, size=8)
    spec = MultiCropSpec((CropGroup(2, 8, (1.0, 1.0)),), flip=False, jitter_p=0.0, grey_p=0.0)
    torch.manual_seed(0)
    crops = resized_crops(x, 8, (1.0, 1.0), flip=False, ratio=(1.0, 1.0))
    torch.testing.assert_close(crops, x, atol=1e-6, rtol=0)
    # multi_crop draws aspect ratios in [3/4, 4/3]: the views then differ from x a little,
    # but each is closest to its own image
    (views,) = multi_crop(x, spec, torch.Generator().manual_seed(1))
    for row in range(6):
        distances = [(views[row] - x[i]).abs().mean() for i in range(3)]
        assert min(range(3), key=lambda i: distances[i]) == row % 3


def test_a_crop_has_the_drawn_size_and_half_of_them_are_flipped():
    """On a horizontal ramp (each pixel's value its x in [-1, 1] coordinates, which bilinear
    sampling reproduces exactly inside the image), a crop of area fraction 1/4 and aspect 1
    is half the side: its slope per output pixel is ±0.5 · 2/8, negative when flipped."""
    ramp = ((torch.arange(16) * 2 + 1) / 16 - 1).expand(1, 1, 16, 16)
    crops = resized_crops(ramp.repeat(400, 1, 1, 1), 8, (0.25, 0.25), flip=True,
                          gen=torch.Generator().manual_seed(0), ratio=(1.0, 1.0))
    slope = crops[:, 0, :, 4] - crops[:, 0, :, 3]  # (400, 8): the middle columns
    torch.testing.assert_close(slope.abs(), torch.full_like(slope, 0.125), atol=1e-5, rtol=0)
    flipped = (slope[:, 0] < 0).float().mean().item()
    assert 0.4 < flipped < 0.6
    torch.testing.assert_close(crops[:, :, 0], crops[:, :, 5])  # no vertical change


def test_a_rotated_crop_turns_by_the_drawn_angle_about_the_same_box():
    """On the ramp, a crop's value steps by cos θ·w·2/S along an output row and by
    −sin θ·h·2/S down a column: θ recovered from the steps is the angle drawn from the
    generator after the box (so the boxes are those of the unrotated crops), within
    ±``rotate``."""
    ramp = ((torch.arange(16) * 2 + 1) / 16 - 1).expand(1, 1, 16, 16).repeat(300, 1, 1, 1)
    kwargs = {"size": 8, "scale": (0.09, 0.09), "flip": False, "ratio": (1.0, 1.0)}
    turned = resized_crops(ramp, gen=torch.Generator().manual_seed(0), rotate=30, **kwargs)
    straight = resized_crops(ramp, gen=torch.Generator().manual_seed(0), **kwargs)
    along = turned[:, 0, 4, 4] - turned[:, 0, 4, 3]
    down = turned[:, 0, 4, 4] - turned[:, 0, 3, 4]
    angle = torch.rad2deg(torch.atan2(-down, along))
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):  # area, aspect, centre x, centre y
        torch.rand(300, generator=gen)
    drawn = -30 + 60 * torch.rand(300, generator=gen)
    torch.testing.assert_close(angle, drawn, atol=1e-2, rtol=0)
    assert angle.abs().max() <= 30 and angle.std() > 10
    # the same boxes: rotation about its centre keeps a linear ramp's mean over the crop
    # (the straight crop's mean is its centre x), where the turned box (half-width at most
    # 0.3·(cos 30° + sin 30°)) stays inside the ramp's exact part, |x| <= 15/16
    centre = straight.mean(dim=(1, 2, 3))
    inside = centre.abs() + 0.3 * 1.37 < 15 / 16
    assert inside.sum() > 150
    torch.testing.assert_close(turned.mean(dim=(1, 2, 3))[inside], centre[inside],
                               atol=1e-5, rtol=0)


def test_greyscale_inputs_get_brightness_and_contrast_only():
    x = (images(64, 1) + 1) / 2
    out = colour_jitter(x, (0.0, 0.0, 0.9, 0.5), p=1.0, gen=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x)  # saturation and hue are identities on one channel
    assert torch.equal(random_grey(x, 1.0), x)
    changed = colour_jitter(x, (0.4, 0.4, 0.0, 0.0), p=1.0, gen=torch.Generator().manual_seed(0))
    assert not torch.allclose(changed, x) and changed.min() >= 0 and changed.max() <= 1


def test_grey_views_have_equal_channels_and_p_0_changes_nothing():
    x = (images(16, 3) + 1) / 2
    grey = random_grey(x, 1.0)
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    assert torch.equal(random_grey(x, 0.0), x)
    assert torch.equal(colour_jitter(x, (0.4, 0.4, 0.4, 0.1), p=0.0), x)


def test_hue_rotation_keeps_grey_pixels_and_a_full_turn_is_the_identity():
    from pipeline.data.multicrop import _rotate_hue

    grey = torch.full((2, 3, 4, 4), 0.5)
    torch.testing.assert_close(_rotate_hue(grey, torch.tensor([0.1, -0.1])), grey)
    x = (images(2, 3, size=4) + 1) / 2 * 0.5 + 0.25  # away from the clipping bounds
    torch.testing.assert_close(_rotate_hue(x, torch.tensor([1.0, 0.0])), x, atol=1e-5, rtol=0)
    assert not torch.allclose(_rotate_hue(x, torch.tensor([0.25, 0.25])), x)
