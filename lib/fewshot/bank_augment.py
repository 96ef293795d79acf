"""Augmented copies of a labelled support slice, so the bank covers small pose and contrast changes
(``bank.augmentations_per_slice``, ``bank.augmentation``): made once at ingestion, stored as bank
entries, and so retrieved, re-ranked and encoded like any other support.

One random affine (rotation, zoom, shift, shear) moves image and mask together: bilinear for the
image, nearest for the mask so label values stay exactly the dataset's own. Colour jitter
(brightness, contrast, gamma) then touches the image only. Every draw comes from the caller's
numpy Generator in a fixed order, so a seed reproduces the same copies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np


@dataclass
class AugmentedSlice:
    image: np.ndarray  # (S, S) float32 in [0, 1]
    mask: np.ndarray  # (S, S) uint16, values a subset of the original's
    description: str  # e.g. "rot=+7.1 scale=0.95 shear=2.0 shift=(3,-5) gamma=1.10"


@dataclass(frozen=True)
class AugmentParams:
    """One draw. Geometry is described as what happens to the content (zoom > 1 enlarges it)."""

    rotation_deg: float
    zoom: float
    shear_deg: float
    shift: tuple[float, float]  # pixels along (rows, columns)
    brightness: float  # added
    contrast: float  # factor around the slice mean
    gamma: float

    def describe(self) -> str:
        return (
            f"rot={self.rotation_deg:+.1f} scale={self.zoom:.2f} shear={self.shear_deg:.1f} "
            f"shift=({self.shift[0]:.0f},{self.shift[1]:.0f}) brightness={self.brightness:+.2f} "
            f"contrast={self.contrast:.2f} gamma={self.gamma:.2f}"
        )


def _range(value, around: float) -> tuple[float, float]:
    """A [lo, hi] pair as given, or a scalar spread symmetrically around ``around``."""
    if isinstance(value, (list, tuple)):
        lo, hi = (float(v) for v in value)
        return lo, hi
    return around - float(value), around + float(value)


def draw_params(params: Mapping, size: int, rng: np.random.Generator) -> AugmentParams:
    """Always draws all seven values in the same order, so switching one term off (0) leaves
    the other draws of the same seed unchanged."""
    rot = rng.uniform(*_range(params.get("rotation_deg", 0.0), 0.0))
    zoom = rng.uniform(*_range(params.get("scale", 0.0), 1.0))
    shear = rng.uniform(*_range(params.get("shear_deg", 0.0), 0.0))
    max_shift = float(params.get("translation", 0.0)) * size
    shift = (rng.uniform(-max_shift, max_shift), rng.uniform(-max_shift, max_shift))
    brightness = rng.uniform(*_range(params.get("brightness", 0.0), 0.0))
    contrast = rng.uniform(*_range(params.get("contrast", 0.0), 1.0))
    gamma = rng.uniform(*_range(params.get("gamma", 0.0), 1.0))
    if zoom <= 0 or gamma <= 0 or contrast < 0:
        raise ValueError(f"augmentation draws must keep scale, gamma > 0 and contrast >= 0; check {dict(params)}")
    return AugmentParams(float(rot), float(zoom), float(shear), (float(shift[0]), float(shift[1])),
                         float(brightness), float(contrast), float(gamma))


def _affine(p: AugmentParams, mode: str):
    from monai.transforms import Affine  # heavy import, only when augmenting

    # MONAI's matrix maps output pixels to input pixels, so the content moves by the inverse:
    # translate by -shift to move the content by +shift, scale by 1/zoom to enlarge it by zoom.
    return Affine(
        rotate_params=math.radians(p.rotation_deg),
        shear_params=(math.tan(math.radians(p.shear_deg)), 0.0),
        translate_params=(-p.shift[0], -p.shift[1]),
        scale_params=(1.0 / p.zoom, 1.0 / p.zoom),
        mode=mode,
        padding_mode="zeros",  # outside the slice is background, for image and mask alike
        image_only=True,
    )


def apply_params(image: np.ndarray, mask: np.ndarray, p: AugmentParams) -> AugmentedSlice:
    img = np.asarray(_affine(p, "bilinear")(image[None].astype(np.float32)))[0]
    lab = np.asarray(_affine(p, "nearest")(mask[None].astype(np.float32)))[0]
    # colour jitter: image only
    img = (img - img.mean()) * p.contrast + img.mean() + p.brightness
    img = np.clip(img, 0.0, 1.0) ** p.gamma
    return AugmentedSlice(
        image=np.clip(img, 0.0, 1.0).astype(np.float32),
        mask=np.rint(lab).astype(np.uint16),  # nearest sampling returns the original values exactly
        description=p.describe(),
    )


def augment_support(
    image: np.ndarray, mask: np.ndarray, count: int, params: Mapping, rng: np.random.Generator
) -> list[AugmentedSlice]:
    """``count`` augmented copies of one support slice; image (S, S) float32 in [0, 1], mask (S, S) uint16."""
    image = np.asarray(image, dtype=np.float32)
    mask = np.asarray(mask)
    if image.ndim != 2 or image.shape != mask.shape:
        raise ValueError(f"expected image and mask of the same (S, S) shape, got {image.shape} and {mask.shape}")
    return [apply_params(image, mask, draw_params(params, image.shape[0], rng)) for _ in range(int(count))]
