"""The shape step of `classic`: labels the atlases draw convex in plane come out convex in plane."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_dataset
from fewshot.decision import LabelDecision
from fewshot.transfer.shape import SolidityCache, make_convex, solidity
from fewshot.types import Atlas


def disc(size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def one_hot(label: np.ndarray, values) -> np.ndarray:
    return np.stack([(label == v).astype(np.float32) for v in values])


def decide(probabilities: np.ndarray, values) -> np.ndarray:
    return np.where(probabilities.max(0) > 0.5, np.asarray(values)[probabilities.argmax(0)], 0)


def atlas_of(mask: np.ndarray, key: str) -> Atlas:
    values = [int(v) for v in np.unique(mask) if v]
    return Atlas(image_id=key, image=np.zeros(mask.shape, np.float32), mask=mask.astype(np.uint16),
                 spacing=(8.0, 1.25, 1.25), components={v: 1 for v in values}, key=key)


def cavity_and_ring(size: int = 64) -> np.ndarray:
    """A blood pool (2) inside a myocardial ring (1) on 3 slices, as a short-axis stack draws them."""
    cavity, wall = disc(size, (32, 32), 12), disc(size, (32, 32), 17)
    plane = np.where(cavity, 2, np.where(wall, 1, 0))
    return np.stack([plane] * 3).astype(np.uint16)


def test_solidity_tells_a_disc_from_a_ring_and_a_crescent():
    mask = cavity_and_ring()
    crescent = disc(64, (32, 20), 14) & ~disc(64, (32, 28), 14)
    mask[:, crescent & (mask[0] == 0)] = 3
    assert solidity(mask, 2, 1.5625) > 0.95
    assert solidity(mask, 1, 1.5625) < 0.6
    assert solidity(mask, 3, 1.5625) < 0.9
    assert solidity(mask, 4, 1.5625) is None  # absent: no shape to measure


def test_a_convex_label_takes_back_what_another_label_took_inside_it_but_not_background():
    truth = cavity_and_ring()
    predicted = truth.copy()
    predicted[1][disc(64, (30, 26), 3)] = 1  # a papillary muscle inside the cavity, handed to the ring
    predicted[1][disc(64, (38, 36), 2)] = 1  # and a second one
    notch = disc(64, (32, 44), 3) & (truth[2] == 2)
    predicted[2][notch] = 0  # a notch of background at the cavity's edge (a real concavity stays)
    values = (1, 2)
    out = decide(make_convex(one_hot(predicted, values), values, [2], LabelDecision(), 1.5625), values)
    np.testing.assert_array_equal(out[1], truth[1])  # the muscles went back to the cavity
    assert (out[2][notch] == 0).all()  # background inside the hull was left alone
    np.testing.assert_array_equal(out[0], truth[0])  # a slice with nothing wrong is unchanged
    unchanged = decide(make_convex(one_hot(predicted, values), values, [], LabelDecision(), 1.5625), values)
    np.testing.assert_array_equal(unchanged, predicted)  # no convex label: nothing happens


def test_a_convex_label_never_takes_from_another_convex_label():
    """Two convex labels whose hulls overlap (a ragged one reaching round the other): neither shape
    says which is right, so fusion's answer stands."""
    plane = np.zeros((64, 64), int)
    plane[disc(64, (32, 20), 12)] = 1
    plane[disc(64, (32, 46), 10)] = 2
    plane[29:35, 22:37] = 2  # label 2 reaches into label 1: each one's hull covers some of the other
    predicted = np.stack([plane] * 2)
    values = (1, 2)
    out = decide(make_convex(one_hot(predicted, values), values, [1, 2], LabelDecision(), 1.0), values)
    np.testing.assert_array_equal(out, predicted)
    taken = decide(make_convex(one_hot(predicted, values), values, [1], LabelDecision(), 1.0), values)
    assert (taken != predicted).any()  # the same hull does take from a label that is not convex


def test_two_pieces_of_one_label_in_a_slice_are_not_bridged():
    """Both kidneys as one label: the hull is taken per piece, never across the two."""
    kidneys = disc(64, (32, 12), 8) | disc(64, (32, 52), 8)
    plane = np.where(kidneys, 2, 0)
    plane[28:36, 22:42] = 1  # something else between them (the spine)
    predicted = np.stack([plane] * 2)
    values = (1, 2)
    out = decide(make_convex(one_hot(predicted, values), values, [2], LabelDecision(), 1.0), values)
    np.testing.assert_array_equal(out, predicted)


def test_convex_labels_are_the_ones_every_atlas_draws_convex_and_are_measured_once():
    cache = SolidityCache()
    atlases = [atlas_of(cavity_and_ring(), "a"), atlas_of(cavity_and_ring(), "b")]
    assert cache.convex_labels(atlases, [1, 2], 0.95) == [2]
    assert cache.convex_labels(atlases, [1, 2], None) == []
    measured = dict(cache._items)
    atlases[0].mask[:] = 0  # the same key promises the same content: the cache answers
    assert cache.convex_labels(atlases, [1, 2], 0.95) == [2] and cache._items == measured


def test_a_real_blood_pool_gets_its_papillary_muscles_back():
    """MS-CMRSeg scan 5: hand the darker half of the left ventricle's blood pool (where papillary
    muscles and trabeculae are) to the myocardium, as registration and fusion do; the step, with the
    solidities of other scans' labels, gives the cavity back."""
    import nibabel as nib

    root = shared_dataset("cmr-bssfp")
    image = np.moveaxis(np.asarray(nib.load(root / "image_5.nii.gz").dataobj, np.float32), 2, 0)
    truth = np.moveaxis(np.asarray(nib.load(root / "label_5.nii.gz").dataobj), 2, 0).astype(np.int32)
    atlases = [atlas_of(np.moveaxis(np.asarray(nib.load(root / f"label_{i}.nii.gz").dataobj), 2, 0), str(i))
               for i in (3, 7, 9)]
    values = (200, 500, 600)
    convex = SolidityCache().convex_labels(atlases, values, 0.97)
    assert convex == [500]  # the blood pool only: not the myocardial ring, not the right ventricle's crescent
    pool = truth == 500
    dark = pool & (image < np.percentile(image[pool], 50))
    eroded = np.zeros_like(pool)
    from scipy import ndimage

    for z in range(len(pool)):  # inside the cavity only: its rim stays a true boundary
        eroded[z] = ndimage.binary_erosion(pool[z], iterations=3)
    damaged = truth.copy()
    damaged[dark & eroded] = 200
    before = 2 * ((damaged == 500) & pool).sum() / ((damaged == 500).sum() + pool.sum())
    out = decide(make_convex(one_hot(damaged, values), values, convex, LabelDecision(), 1.5625), values)
    after = 2 * ((out == 500) & pool).sum() / ((out == 500).sum() + pool.sum())
    assert before < 0.9 and after > 0.98, (before, after)
    assert ((out == 600) == (truth == 600)).all()  # the right ventricle is not touched


def test_min_solidity_is_a_number_or_none_and_anything_else_is_a_clear_error():
    """``--set transfer.shape.min_solidity=...``: a bad value names the setting (a ConfigError), never a bare ValueError."""
    from fewshot.config import ConfigError
    from fewshot.transfer.shape import ShapeSettings

    assert ShapeSettings.from_settings({"min_solidity": "none"}).min_solidity is None
    assert ShapeSettings.from_settings({"min_solidity": None}).min_solidity is None
    assert ShapeSettings.from_settings({"min_solidity": "0.97"}).min_solidity == 0.97  # a --set string
    assert ShapeSettings.from_settings({"min_solidity": 1}).min_solidity == 1.0
    for bad in ("small", False, True, [0.9]):  # yaml reads false / off / no as a bool: an error, not 0
        with pytest.raises(ConfigError, match="transfer.shape.min_solidity must be a number or none"):
            ShapeSettings.from_settings({"min_solidity": bad})
