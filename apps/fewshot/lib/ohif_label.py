"""OHIF's raw labelmap (``label.bin``) as a NIfTI label on its image's own grid.

The app's OHIF panel saves the viewer's labelmap as raw bytes, x fastest, in the order of the
volume OHIF built from the DICOM series, and says where that volume lies (``params.ohif_grid``:
cornerstone's dimensions, spacing, origin and direction, in DICOM's LPS millimetres). In a DICOMweb
datastore the image is ITK's conversion of that same series, so the order is the image's own. A
local datastore's image may be stored in any axis order: the labelmap is turned onto the image's
grid (a permutation and flips of its axes, no resampling), and refused with 422 when the viewer's
voxels do not lie on the image's voxels, since a label placed by guesswork would teach the bank
organs where there are none.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from fastapi import HTTPException
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from fewshot.volume import VolumeError, label_nifti, read_header

GRID_KEY = "ohif_grid"  # in the save's params; not kept in the label's info
RAW_SUFFIX = ".bin"
# The viewer's voxel centres must lie this close to the image's (a fraction of the smallest voxel
# side): DICOM positions and a NIfTI's float32 affine round differently, a misplaced grid is off by
# a voxel or more.
GRID_TOLERANCE_VOXELS = 0.1


def is_raw(path: str) -> bool:
    return path.lower().endswith(RAW_SUFFIX)


@dataclass(frozen=True)
class ViewerGrid:
    """Where OHIF's volume lies: voxel (i, j, k) is at origin + i*sx*d0 + j*sy*d1 + k*sz*d2 (LPS mm),
    d0..d2 the three triplets of ``direction`` (cornerstone's row, column and slice directions)."""
    dimensions: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def parse(cls, value: Any, image_id: str) -> "ViewerGrid":
        what = f"params.{GRID_KEY} of the label for {image_id!r}"

        def numbers(key: str, count: int) -> tuple[float, ...]:
            items = value.get(key) if isinstance(value, dict) else None
            if not isinstance(items, list) or len(items) != count or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in items):
                raise HTTPException(422, f"{what}: '{key}' must be a list of {count} finite numbers (OHIF's volume "
                                         "dimensions, spacing, origin and direction)")
            return tuple(float(x) for x in items)

        dims = numbers("dimensions", 3)
        if any(d < 1 or d != int(d) for d in dims):
            raise HTTPException(422, f"{what}: 'dimensions' must be whole numbers >= 1, got {list(dims)}")
        spacing = numbers("spacing", 3)
        if any(s <= 0 for s in spacing):
            raise HTTPException(422, f"{what}: 'spacing' must be > 0, got {list(spacing)}")
        grid = cls(tuple(int(d) for d in dims), spacing, numbers("origin", 3), numbers("direction", 9))
        axes = np.asarray(grid.direction).reshape(3, 3)
        if abs(abs(np.linalg.det(axes)) - 1) > 1e-3 or not np.allclose(axes @ axes.T, np.eye(3), atol=1e-3):
            raise HTTPException(422, f"{what}: 'direction' is not three orthonormal directions: {list(grid.direction)}")
        return grid

    def affine(self) -> np.ndarray:
        """The RAS affine of the viewer's voxel grid (NIfTI's convention)."""
        lps = np.eye(4)
        lps[:3, :3] = np.asarray(self.direction).reshape(3, 3).T * np.asarray(self.spacing)
        lps[:3, 3] = self.origin
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def pop_grid(info: dict, image_id: str) -> ViewerGrid | None:
    value = info.pop(GRID_KEY, None)
    return None if value is None else ViewerGrid.parse(value, image_id)


def _corner_offset(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> float:
    """The largest distance (mm) between the two grids' positions of the volume's corner voxels."""
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)], float).T
    return float(np.max(np.linalg.norm((a @ corners - b @ corners)[:3], axis=0)))


def turn_onto(data: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, target_shape: tuple[int, ...],
              image_id: str) -> np.ndarray:
    """``data`` (on ``affine``) with its axes permuted and flipped onto the target grid; 422 when its
    voxels do not lie on the target's voxels."""
    turn = ornt_transform(io_orientation(affine), io_orientation(target_affine))
    turned = apply_orientation(data, turn)
    moved = affine @ inv_ornt_aff(turn, data.shape)
    shape = tuple(int(s) for s in target_shape)
    offset = _corner_offset(moved, target_affine, shape) if turned.shape == shape else None
    voxel = float(np.min(np.linalg.norm(np.asarray(target_affine)[:3, :3], axis=0)))
    if offset is None or offset > GRID_TOLERANCE_VOXELS * voxel:
        where = (f"{turned.shape} voxels against the image's {shape}" if offset is None
                 else f"corner voxels up to {offset:.2f} mm from the image's")
        raise HTTPException(422, f"the viewer's volume of {image_id!r} does not lie on the image's voxel grid ({where}): "
                                 "is the image in the datastore this series' scan?")
    return np.ascontiguousarray(turned)


def raw_to_nifti(image_id: str, image_path: str, raw_path: str, out: str, grid: ViewerGrid | None,
                 grid_required: bool) -> str:
    """Writes the raw label as NIfTI on the image's grid (its affine and header); returns ``out``."""
    try:
        header = read_header(image_path)
    except VolumeError:
        header = None
    if header is None:
        raise HTTPException(409, f"image {image_id!r} in the datastore has no readable NIfTI or NRRD header, "
                                 "so a raw label cannot be placed on it")
    image_shape = tuple(int(s) for s in header.shape[:3])
    if grid is None and grid_required:
        raise HTTPException(422, f"a raw label (label.bin) for {image_id!r} needs params.{GRID_KEY} (the viewer volume's "
                                 "dimensions, spacing, origin and direction): the image in this datastore may be stored in "
                                 "another voxel order than the viewer's, and a label is never placed by guesswork")
    shape = grid.dimensions if grid is not None else image_shape
    voxels = int(np.prod(shape))
    size = os.path.getsize(raw_path)
    dtype = {voxels: np.dtype(np.uint8), 2 * voxels: np.dtype("<u2")}.get(size)
    if dtype is None:
        raise HTTPException(
            422, f"the uploaded raw label for {image_id!r} has {size} bytes; the viewer's volume of {image_id} has "
            f"{shape} voxels, so its raw label (label.bin) has {voxels} bytes (uint8) or {2 * voxels} (uint16)",
        )
    data = np.fromfile(raw_path, dtype=dtype).reshape(shape, order="F")
    if grid is not None:
        data = turn_onto(data, grid.affine(), header.affine, image_shape, image_id)
    img = nib.load(image_path) if header is not None and not image_path.lower().endswith(".nrrd") else None
    nib.save(label_nifti(np.ascontiguousarray(data), header.affine, img.header if img is not None else None), out)
    return out
