"""Overlap and surface-distance scores between a predicted and a reference mask.

Conventions (the few-shot literature does not agree on them, so they are explicit here):

* Dice of two empty masks is 1.0 by default (nothing to find, nothing found); pass
  ``both_empty=float("nan")`` to leave such cases out of a mean instead.
* HD95 is in millimetres: the 95th percentile of the *pooled* symmetric surface distances
  (distances from every predicted surface voxel to the reference surface, together with those
  from every reference surface voxel to the predicted surface), as in MedPy's ``hd95``.
  It is ``nan`` when exactly one of the two masks is empty (no surface to measure to) and
  ``0.0`` when both are.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class LabelScore:
    """Scores of one label in one case."""

    dice: float
    hd95: float  # mm; nan when exactly one of prediction and reference is empty

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CaseLabelScore:
    """One row of a results table: a label's scores in one query case (what the plots read)."""

    case_id: str
    label: int
    dice: float
    hd95: float
    label_name: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def dice(pred: np.ndarray, truth: np.ndarray, both_empty: float = 1.0) -> float:
    """Dice overlap 2|P∩T| / (|P|+|T|) of two masks of the same shape (any non-zero is inside).

    ``both_empty`` is returned when neither mask has a voxel: 1.0 by default, ``nan`` when the
    caller wants such cases excluded from averages.
    """
    p = np.asarray(pred).astype(bool, copy=False)
    t = np.asarray(truth).astype(bool, copy=False)
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: prediction {p.shape} vs reference {t.shape}")
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return float(both_empty)
    return 2.0 * int(np.logical_and(p, t).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: inside the mask with at least one face-neighbour outside it.

    Voxels on the array's edge count as boundary (erosion pads with background).
    """
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, iterations=1, border_value=0)


def _union_box(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of both masks grown by one voxel, clipped to the array.

    Cropping to it is exact: every surface voxel lies inside it, Euclidean distances do not depend
    on what lies outside, and the one-voxel margin keeps erosion's result unchanged.
    """
    coords = np.argwhere(a | b)
    lo = np.maximum(coords.min(axis=0) - 1, 0)
    hi = np.minimum(coords.max(axis=0) + 2, a.shape)
    return tuple(slice(int(l), int(h)) for l, h in zip(lo, hi))


def surface_distances(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Pooled symmetric surface distances in mm (both directions), for masks that are both non-empty."""
    p = np.asarray(pred).astype(bool, copy=False)
    t = np.asarray(truth).astype(bool, copy=False)
    box = _union_box(p, t)
    p, t = p[box], t[box]
    p_surf, t_surf = _surface(p), _surface(t)
    # distance_transform_edt measures to the nearest zero, so the surface is handed in as zeros.
    to_truth = ndimage.distance_transform_edt(~t_surf, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~p_surf, sampling=spacing)
    return np.concatenate([to_truth[p_surf], to_pred[t_surf]])


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """95th percentile Hausdorff distance in mm, in 2D or 3D; ``spacing`` is per array axis.

    Empty prediction or empty reference -> ``nan``; both empty -> 0.0.
    """
    p = np.asarray(pred).astype(bool, copy=False)
    t = np.asarray(truth).astype(bool, copy=False)
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: prediction {p.shape} vs reference {t.shape}")
    if len(spacing) != p.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {p.ndim}D mask")
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return 0.0
    if not p_any or not t_any:
        return math.nan
    return float(np.percentile(surface_distances(p, t, tuple(float(s) for s in spacing)), 95))
