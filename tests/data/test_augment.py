"""The affine view's shear (pipeline/data/augment.py): a slant, bounded by ``shear``."""

import numpy as np
import torch

from pipeline.data.augment import AugmentSpec, random_affine


def bar_slopes(spec: AugmentSpec, n: int = 64) -> np.ndarray:
    """Warp n images of one vertical bar; the slope d(column)/d(row) of each warped bar."""
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 4:24, 13:15] = 1.0
    out = random_affine(x, spec, torch.Generator().manual_seed(0))[:, 0].numpy()
    rows, cols = np.arange(28), np.arange(28)
    slopes = []
    for img in out:
        mass = img.sum(1)
        keep = mass > 0.5
        centre = (img[keep] * cols).sum(1) / mass[keep]
        slopes.append(np.polyfit(rows[keep], centre, 1)[0])
    return np.array(slopes)


def test_shear_slants_a_vertical_bar_by_at_most_the_shear_factor_both_ways():
    plain = dict(rotate_deg=0.0, scale=(1.0, 1.0), translate=0.0, brightness=0.0,
                 contrast=0.0)
    assert np.abs(bar_slopes(AugmentSpec(**plain))).max() < 0.01  # no shear: stays upright
    slopes = bar_slopes(AugmentSpec(shear=0.3, **plain))
    assert np.abs(slopes).max() <= 0.3 + 0.02  # x_in = x_out + s·y_out: slope -s
    assert slopes.min() < -0.2 and slopes.max() > 0.2  # both slants, near the bound
