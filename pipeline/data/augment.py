"""Batched, on-device augmentation for two-view consistency (no Ray, no per-image Python).

:class:`AugmentSpec`: one random affine warp per image (rotation, scale, translation,
optional horizontal flip) via ``affine_grid``/``grid_sample``, then brightness/contrast
jitter. Digits must not be flipped, so flipping is off unless asked for (natural images).

:func:`colour_view`: SimCLR's view of a natural image (Chen et al. 2020): a random resized
crop, a flip, colour jitter and random greyscale, one
:mod:`~pipeline.data.multicrop` crop group at the input's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.data.multicrop import CropGroup, MultiCropSpec, multi_crop


@dataclass(frozen=True)
class AugmentSpec:
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.85, 1.1)
    translate: float = 0.1  # fraction of the image side
    shear: float = 0.0  # horizontal shear factor, uniform in [-shear, shear] (slant)
    flip: bool = False
    brightness: float = 0.2
    contrast: float = 0.2


def random_affine(x: torch.Tensor, spec: AugmentSpec, gen: torch.Generator | None = None
                  ) -> torch.Tensor:
    """x float (n, C, H, W) -> warped (n, C, H, W), zero padding in normalised space."""
    n, dev = x.shape[0], x.device
    u = torch.rand(n, 4, generator=gen).to(dev)
    angle = (u[:, 0] * 2 - 1) * math.radians(spec.rotate_deg)
    scale = spec.scale[0] + u[:, 1] * (spec.scale[1] - spec.scale[0])
    shift = (u[:, 2:] * 2 - 1) * spec.translate * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # rotation·shear: [[cos, -sin], [sin, cos]] @ [[1, s], [0, 1]]
    s = ((torch.rand(n, generator=gen) * 2 - 1) * spec.shear).to(dev) if spec.shear else 0.0
    theta = torch.stack([torch.stack([cos, cos * s - sin, shift[:, 0]], 1),
                         torch.stack([sin, sin * s + cos, shift[:, 1]], 1)], 1)
    if spec.flip:
        flips = (torch.rand(n, generator=gen) < 0.5).to(dev)
        theta[flips, :, 0] *= -1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    background = x.amin(dim=(1, 2, 3), keepdim=True)
    out = F.grid_sample(x - background, grid, align_corners=False, padding_mode="zeros")
    return out + background


def jitter(x: torch.Tensor, spec: AugmentSpec, gen: torch.Generator | None = None
           ) -> torch.Tensor:
    """Per-image brightness shift and contrast scale around the image mean."""
    n = x.shape[0]
    b = ((torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * spec.brightness).to(x.device)
    c = (1 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * spec.contrast).to(x.device)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c + mean + b


def augment(x: torch.Tensor, spec: AugmentSpec, gen: torch.Generator | None = None
            ) -> torch.Tensor:
    """One random view of a batch of normalised images, float (n, C, H, W)."""
    return jitter(random_affine(x, spec, gen), spec, gen)


View = AugmentSpec | MultiCropSpec  # the spec of one random view of a batch


def colour_view(size: int, mean: tuple[float, ...], std: tuple[float, ...],
                scale: tuple[float, float]) -> MultiCropSpec:
    """SimCLR's view at ``size`` px of images normalised by ``mean``/``std``: crop area
    fraction in ``scale``, flip p 0.5, jitter (0.4, 0.4, 0.4, 0.1) p 0.8, greyscale p 0.2."""
    return MultiCropSpec((CropGroup(1, size, scale),), mean, std, flip=True,
                         jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grey_p=0.2)


def random_view(x: torch.Tensor, spec: View, gen: torch.Generator | None = None
                ) -> torch.Tensor:
    """One random view of a batch of normalised images: (n, C, H, W) float -> same shape
    (a :class:`MultiCropSpec` of one crop at the input's size)."""
    if isinstance(spec, MultiCropSpec):
        return multi_crop(x, spec, gen)[0]
    return augment(x, spec, gen)
