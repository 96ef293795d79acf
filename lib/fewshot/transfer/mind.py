"""A deformable stage that matches structure, not intensity: MIND-SSC features searched by convexAdam.

Demons moves the atlas's intensities onto the query's. Between two patients' MR scans the same tissue
differs in brightness (coil shading, contrast, flow), and histogram matching evens that out only
globally, so demons also follows edges that are not the same anatomy. MIND-SSC (Heinrich et al.
2013) describes each voxel by how its neighbourhood's patches resemble each other: the same
description for the same structure under another contrast. convexAdam (Siebert, Hansen & Heinrich
2021; the `convexAdam` package) searches a displacement for every control point over a whole cube
of candidates (a global optimum within ``search``, where demons descends to the nearest local
one), smooths those by coupled convex optimisation, makes them inverse-consistent, and refines
the field with Adam under a diffusion penalty (``smoothness``).

convexAdam's grid is voxels, so both images are resampled to an isotropic grid of ``spacing_mm``
first (thick slices interpolated along z) and the field comes back to the query's grid as physical
displacements. Its time grows with that grid's voxels (the Adam refinement dominates), so a region
larger than ``max_voxels`` at ``spacing_mm`` gets a coarser grid that holds ``max_voxels`` (a heart's
region keeps 2 mm: the two CMR design pairs' hold 0.28 and 0.42 million voxels; a CHAOS abdomen's about
2 million, so it gets about 3 mm under the preset's 0.6 million). It runs on the CPU in the
worker's thread budget; torch is imported on first use.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class MindLevels:
    """``transfer.mind``: used when ``transfer.deformable.method`` is "mind"."""

    spacing_mm: float  # the isotropic grid the field is estimated on
    grid: int  # control-point spacing of the discrete search, in voxels of that grid
    search: int  # displacements tried each way per axis, in control-point spacings: a cube of (2 search + 1)^3
    iterations: int  # Adam iterations refining the field
    adam_grid: int  # voxels of that grid per side of one voxel of the field Adam refines (features averaged over it)
    smoothness: float  # weight of the field's diffusion penalty during the Adam refinement
    max_voxels: int  # a larger region is estimated on a coarser grid that holds this many voxels


def grid_spacing(image: sitk.Image, levels: MindLevels) -> float:
    """``levels.spacing_mm``, or the coarser side at which ``image``'s extent holds ``levels.max_voxels``."""
    volume_mm3 = float(np.prod([n * s for n, s in zip(image.GetSize(), image.GetSpacing())]))
    return max(float(levels.spacing_mm), (volume_mm3 / float(levels.max_voxels)) ** (1.0 / 3.0))


def isotropic_grid(image: sitk.Image, spacing_mm: float, multiple: int) -> sitk.Image:
    """An empty image over ``image``'s extent (same origin and directions) with cubic voxels of
    ``spacing_mm``, each size rounded up to a multiple of ``multiple`` (convexAdam pools by it)."""
    size = [int(np.ceil(n * s / spacing_mm)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    size = [max(multiple, int(np.ceil(n / multiple)) * multiple) for n in size]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing([float(spacing_mm)] * 3)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    return grid


def _convex_adam():
    # The package silences every warning of the process when imported; keep the process's filters.
    with warnings.catch_warnings():
        from convexAdam.convex_adam_MIND import convex_adam_pt
    return convex_adam_pt


def mind_field(fixed: sitk.Image, moving: sitk.Image, levels: MindLevels) -> sitk.Transform:
    """Displacement field on the fixed grid that carries ``moving`` (already close) onto ``fixed``."""
    import torch

    convex_adam_pt = _convex_adam()
    spacing = grid_spacing(fixed, levels)
    grid = isotropic_grid(fixed, spacing, 2 * levels.grid)
    f, m = (sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(i, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, 0.0))
            for i in (fixed, moving))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()))
    try:
        with warnings.catch_warnings():  # its calls of torch's grid_sample name no align_corners: say nothing
            warnings.filterwarnings("ignore", category=UserWarning, module=r"convexAdam\.")
            # (z, y, x) arrays in, voxel displacements along those axes out: warped(p) = moving(p + d(p)).
            disp = convex_adam_pt(torch.from_numpy(np.ascontiguousarray(f)), torch.from_numpy(np.ascontiguousarray(m)),
                                  grid_sp=int(levels.grid), disp_hw=int(levels.search), selected_niter=int(levels.iterations),
                                  lambda_weight=float(levels.smoothness), grid_sp_adam=int(levels.adam_grid), ic=True,
                                  dtype=torch.float32, device=torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    physical = np.stack([disp[..., 2], disp[..., 1], disp[..., 0]], axis=-1) * spacing  # (x, y, z) mm
    directions = np.asarray(grid.GetDirection()).reshape(3, 3)
    physical = physical @ directions.T  # index axes -> world axes (identity on the canvas grid)
    field = sitk.GetImageFromArray(physical.astype(np.float64), isVector=True)
    field.CopyInformation(grid)
    field = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
