"""The MIND-SSC deformable stage of `classic` (transfer/mind.py: convexAdam on an isotropic grid)."""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from fewshot.config import ConfigError, load_preset
from fewshot.transfer.mind import MindLevels, grid_spacing, isotropic_grid, mind_field

SPACING = (1.25, 1.25, 8.0)  # (x, y, z) mm: a short-axis cardiac stack
# The preset's MIND settings, read from it so that a change of the default is what these tests run, but a
# round voxel budget for the grid tests.
LEVELS = dataclasses.replace(MindLevels(**load_preset("classic")["transfer"]["mind"]), max_voxels=1_000_000)


def image(array: np.ndarray) -> sitk.Image:
    out = sitk.GetImageFromArray(array.astype(np.float32))
    out.SetSpacing(SPACING)
    out.SetOrigin((-40.0, 12.0, 3.0))
    return out


def scene() -> tuple[np.ndarray, np.ndarray]:
    """A bright disc (a blood pool) in a darker ring over slices 2-9 of 12, on a textured
    background so that MIND sees structure everywhere. Returns (image, mask of the disc)."""
    z, y, x = np.mgrid[:12, :96, :96].astype(np.float64)
    r = np.hypot((y - 50) * 1.25, (x - 46) * 1.25)
    inside = (z >= 2) & (z <= 9)
    disc = inside & (r <= 18.0)
    ring = inside & (r > 18.0) & (r <= 26.0)
    texture = 0.15 * np.sin(y / 3.0) * np.cos(x / 4.0)
    array = 0.2 + texture + 0.6 * disc + 0.3 * ring
    return ndimage.gaussian_filter(array, (0, 1, 1)), disc


def moved(array: np.ndarray, transform: sitk.Transform, interpolator=sitk.sitkLinear) -> np.ndarray:
    """``array`` (on the test grid) resampled through ``transform``: out(p) = array(transform(p))."""
    grid = image(array)
    return sitk.GetArrayFromImage(sitk.Resample(grid, grid, transform, interpolator, 0.0))


def shift_and_swell() -> sitk.Transform:
    """The moving scan's heart 7.5 mm off in plane and a quarter larger, sampled from the fixed one."""
    t = sitk.AffineTransform(3)
    t.SetCenter((-40.0 + 46 * 1.25, 12.0 + 50 * 1.25, 3.0 + 5.5 * 8.0))
    t.SetMatrix((0.8, 0, 0, 0, 0.8, 0, 0, 0, 1.0))
    t.SetTranslation((-7.5, 5.0, 0.0))
    return t


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


@pytest.mark.parametrize("adam_grid", [2, 3])  # 3: Adam refines a coarser field, and the grid is no multiple of it
def test_a_known_shift_and_swelling_is_recovered_through_thick_slices(adam_grid):
    fixed, fixed_disc = scene()
    moving = moved(fixed, shift_and_swell())
    moving_disc = moved(fixed_disc.astype(np.float32), shift_and_swell()) > 0.5
    before = dice(fixed_disc, moving_disc)
    transform = mind_field(image(fixed), image(moving), dataclasses.replace(LEVELS, adam_grid=adam_grid))
    warped = sitk.Resample(image(moving_disc.astype(np.float32)), image(fixed), transform, sitk.sitkLinear, 0.0)
    after = dice(fixed_disc, sitk.GetArrayFromImage(warped) > 0.5)
    assert before < 0.7 and after >= 0.9, (before, after)
    # Nothing moves along z that the slices do not show: the stack's empty end slices stay empty.
    assert not (sitk.GetArrayFromImage(warped)[[0, 11]] > 0.5).any()


def test_the_field_repeats_exactly_and_leaves_the_process_warning_filters_alone():
    fixed, _ = scene()
    moving = moved(fixed, shift_and_swell())
    filters = list(warnings.filters)
    first = sitk.GetArrayFromImage(mind_field(image(fixed), image(moving), LEVELS).GetDisplacementField())
    assert list(warnings.filters) == filters  # convexAdam silences every warning when imported
    second = sitk.GetArrayFromImage(mind_field(image(fixed), image(moving), LEVELS).GetDisplacementField())
    assert np.array_equal(first, second)


def test_the_isotropic_grid_covers_the_image_in_whole_pooling_cells():
    grid = isotropic_grid(image(np.zeros((12, 96, 90))), 2.0, 8)
    assert grid.GetSpacing() == (2.0, 2.0, 2.0) and grid.GetOrigin() == (-40.0, 12.0, 3.0)
    assert grid.GetSize() == (64, 64, 48)  # 112.5, 120 and 96 mm in whole 16 mm cells


def test_a_large_region_gets_a_coarser_grid_that_holds_the_voxel_budget():
    heart = image(np.zeros((12, 96, 96)))  # 120 x 120 x 96 mm: 172,800 voxels at 2 mm
    assert grid_spacing(heart, LEVELS) == 2.0
    abdomen = image(np.zeros((30, 256, 256)))  # 320 x 320 x 240 mm
    spacing = grid_spacing(abdomen, LEVELS)
    assert 2.0 < spacing and abs(320 * 320 * 240 / spacing ** 3 - 1_000_000) < 1.0


def test_mind_settings_reject_what_they_cannot_run():
    from fewshot.transfer.atlas import AtlasTransfer

    good = load_preset("classic")["transfer"]
    assert good["deformable"]["method"] == "mind"  # the preset's default since the 17th session
    assert AtlasTransfer(good).settings.registration.mind == MindLevels(**good["mind"])
    for mind in ({**good["mind"], "grid": 0}, {**good["mind"], "spacing_mm": -1}, {**good["mind"], "max_voxels": 10},
                 {**good["mind"], "adam_grid": 0}):
        with pytest.raises(ConfigError, match="mind"):
            AtlasTransfer({**good, "mind": mind})
    with pytest.raises(ConfigError, match="in_plane.method 'mind'"):
        AtlasTransfer({**good, "in_plane": {**good["in_plane"], "method": "mind"}})
