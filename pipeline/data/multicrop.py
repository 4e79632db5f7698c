"""Batched multi-crop views on the training device (SwAV's multi-crop, Caron et al. 2020;
IMC-SwAV, Ntelemis et al. 2021). No Ray, no PIL, no per-image Python.

A batch of decoded, normalised images (n, C, H, W) becomes a few *crop groups*, each one
tensor (count·n, C, size, size) holding ``count`` random views of every image, crop-major
(view j of image i is row j·n + i): the network forwards each group at once, as SwAV
forwards same-resolution crops together. Each view is, in this order:

1. a random resized crop (:func:`resized_crops`): area fraction uniform in ``scale``,
   aspect ratio log-uniform in [3/4, 4/3], as torchvision's ``RandomResizedCrop``, except
   that a box that does not fit is clamped to the image instead of redrawn; plus a
   horizontal flip with probability 1/2 when ``flip``, and a rotation of the box by an
   angle uniform in [−``rotate``, ``rotate``] degrees when ``rotate`` > 0 (border pixels
   fill what it brings in). One ``affine_grid``/``grid_sample`` per group does crop,
   resize (bilinear), flip and rotation.
2. with probability ``jitter_p``, colour jitter (:func:`colour_jitter`): brightness,
   contrast, saturation and hue factors drawn per view as torchvision's ``ColorJitter``
   (b, c, s in [1 − x, 1 + x], hue in [−h, h] of a turn), applied in that fixed order (not
   a random one), with hue a rotation of the chroma plane in YIQ space;
3. with probability ``grey_p``, greyscale (ITU-R 601 luma in every channel).

Colour steps work on [0, 1] pixels: the views are de-normalised, clipped after each step
and normalised again. Greyscale inputs (one channel) get brightness and contrast only:
saturation, hue and greyscale are identities there.

Random numbers come from ``gen`` (a CPU :class:`torch.Generator`; None = torch's global
one, which the runners seed per step) and are drawn on the CPU, so a seed gives the same
views on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# RGB -> YIQ (NTSC) and back: Y is the luma that greyscale and contrast use.
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_LUMA = _YIQ[0]


@dataclass(frozen=True)
class CropGroup:
    """``count`` views per image, ``size`` px square, area fraction in ``scale``."""

    count: int
    size: int
    scale: tuple[float, float]


@dataclass(frozen=True)
class MultiCropSpec:
    """Crop groups (global first) and the photometric augmentation of every view."""

    groups: tuple[CropGroup, ...]
    mean: tuple[float, ...] = (0.5,)  # the normalisation of the input pixels
    std: tuple[float, ...] = (0.5,)
    flip: bool = True
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # b, c, s, hue
    jitter_p: float = 0.8
    grey_p: float = 0.25
    rotate: float = 0.0  # degrees; 0 draws no angle, so the other draws stay as they were

    @property
    def views(self) -> int:
        return sum(g.count for g in self.groups)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def resized_crops(x: torch.Tensor, size: int, scale: tuple[float, float], flip: bool,
                  gen: torch.Generator | None = None,
                  ratio: tuple[float, float] = (3 / 4, 4 / 3),
                  rotate: float = 0.0) -> torch.Tensor:
    """One random resized crop per row: x (m, C, H, W) -> (m, C, size, size), same dtype and
    device. Unrotated boxes lie inside the image; a box rotated by up to ``rotate``
    degrees may reach past it, and the border pixels fill that part."""
    m = x.shape[0]
    area = _uniform(m, scale[0], scale[1], gen)
    aspect = torch.exp(_uniform(m, math.log(ratio[0]), math.log(ratio[1]), gen))
    w = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the side
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (2 * torch.rand(m, generator=gen) - 1) * (1 - w)  # centres in [-1, 1] coordinates
    cy = (2 * torch.rand(m, generator=gen) - 1) * (1 - h)
    sx = w
    if flip:
        sx = torch.where(torch.rand(m, generator=gen) < 0.5, -w, w)
    cos, sin = torch.ones(m), torch.zeros(m)
    if rotate > 0:  # drawn last, so the boxes are those of an unrotated crop
        angle = torch.deg2rad(_uniform(m, -rotate, rotate, gen))
        cos, sin = torch.cos(angle), torch.sin(angle)
    # the box's axes R(angle) @ diag(sx, h) about its centre (cx, cy)
    theta = torch.stack([torch.stack([cos * sx, -sin * h, cx], 1),
                         torch.stack([sin * sx, cos * h, cy], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), [m, x.shape[1], size, size],
                         align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(m, C, H, W) in [0, 1] -> (m, 1, H, W): ITU-R 601 luma (the channel itself if C = 1)."""
    if x.shape[1] == 1:
        return x
    return torch.einsum("mchw,c->mhw", x, _LUMA.to(x.device, x.dtype)).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor·x + (1 − factor)·other, clipped to [0, 1]; factor (m,)."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp(0.0, 1.0)


def _rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma (I, Q) of RGB x (m, 3, H, W) by ``turns`` (m,) of a full turn."""
    yiq = _YIQ.to(x.device, x.dtype)
    angle = 2 * math.pi * turns.to(x.device, x.dtype)
    cos, sin, one, zero = torch.cos(angle), torch.sin(angle), torch.ones_like(angle), \
        torch.zeros_like(angle)
    rot = torch.stack([torch.stack([one, zero, zero], 1), torch.stack([zero, cos, -sin], 1),
                       torch.stack([zero, sin, cos], 1)], 1)  # (m, 3, 3)
    matrix = torch.linalg.inv(yiq) @ rot @ yiq  # RGB -> YIQ -> rotated -> RGB
    return torch.einsum("mij,mjhw->mihw", matrix, x).clamp(0.0, 1.0)


def colour_jitter(x: torch.Tensor, strength: tuple[float, float, float, float], p: float,
                  gen: torch.Generator | None = None) -> torch.Tensor:
    """x (m, C, H, W) in [0, 1]: each row jittered with probability ``p`` (module docstring);
    the others unchanged. Saturation and hue apply to RGB (C = 3) only."""
    m = x.shape[0]
    b, c, s, hue = strength
    on = torch.rand(m, generator=gen) < p

    def factor(x_: float) -> torch.Tensor:
        return torch.where(on, _uniform(m, max(0.0, 1 - x_), 1 + x_, gen), 1.0).to(x.device)

    brightness, contrast, saturation = factor(b), factor(c), factor(s)
    turns = torch.where(on, _uniform(m, -hue, hue, gen), 0.0)
    out = (x * brightness.view(-1, 1, 1, 1)).clamp(0.0, 1.0)
    out = _blend(out, _luma(out).mean(dim=(1, 2, 3), keepdim=True), contrast)
    if x.shape[1] == 3:
        out = _blend(out, _luma(out), saturation)
        if hue:
            out = _rotate_hue(out, turns)
    return torch.where(on.to(x.device).view(-1, 1, 1, 1), out, x)


def random_grey(x: torch.Tensor, p: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """x (m, C, H, W): each row replaced by its luma in every channel with probability p."""
    pick = (torch.rand(x.shape[0], generator=gen) < p).to(x.device).view(-1, 1, 1, 1)
    if x.shape[1] == 1:
        return x
    return torch.where(pick, _luma(x).expand_as(x), x)


def _channel_stats(values: tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=x.dtype, device=x.device).expand(x.shape[1]).view(
        1, -1, 1, 1)


def multi_crop(x: torch.Tensor, spec: MultiCropSpec, gen: torch.Generator | None = None
               ) -> list[torch.Tensor]:
    """Normalised images x (n, C, H, W) float -> one normalised tensor per crop group,
    (count·n, C, size, size), crop-major (module docstring). The images are decoded once;
    every view is made from this batch on its device."""
    mean, std = _channel_stats(spec.mean, x), _channel_stats(spec.std, x)
    out = []
    for group in spec.groups:
        views = resized_crops(x.repeat(group.count, 1, 1, 1), group.size, group.scale,
                              spec.flip, gen, rotate=spec.rotate)
        views = (views * std + mean).clamp(0.0, 1.0)
        views = colour_jitter(views, spec.jitter, spec.jitter_p, gen)
        views = random_grey(views, spec.grey_p, gen)
        out.append((views - mean) / std)
    return out
