"""The extent step of `classic`: a label runs along the slices no further than its atlases allow."""
from __future__ import annotations

import numpy as np
import pytest

from fewshot.config import ConfigError, load_preset
from fewshot.decision import LabelDecision
from fewshot.transfer.extent import (LONGEST, MEAN, AtlasProfiles, ProfileCache, allowed_slices, best_window, end_offsets_mm,
                                     label_profile, limit_extent, relative_ends)
from fewshot.types import Atlas
from project_scripts import load_script

SIZE = 48


def disc(radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 <= radius ** 2


def heart(slices: int, first: int, radii) -> np.ndarray:
    """A label (1) over ``len(radii)`` slices from ``first``, one disc per slice: an apex to base profile."""
    mask = np.zeros((slices, SIZE, SIZE), np.uint16)
    for z, r in enumerate(radii):
        mask[first + z][disc(r)] = 1
    return mask


APEX_TO_BASE = [3, 6, 8, 10, 11, 12, 13, 14, 15, 15]  # ten slices, broadest at the base
ATRIA = [12, 10, 9, 8, 7]  # what a stretched atlas draws past the base: shrinking again


def decided(probabilities: np.ndarray) -> np.ndarray:
    return np.where(probabilities.max(0) > 0.5, probabilities.argmax(0) + 1, 0)


def test_a_label_stretched_past_the_base_is_cut_back_to_where_the_atlas_profile_fits():
    atlas = label_profile(heart(13, 1, APEX_TO_BASE), 1, slice_mm=8.0)
    assert len(atlas.areas) == 10 and atlas.length_mm == 80.0
    truth = heart(19, 2, APEX_TO_BASE)  # the query's heart: slices 2-11
    predicted = heart(19, 2, APEX_TO_BASE + ATRIA)  # and five slices over the atria (12-16)
    probabilities = predicted[None].astype(np.float32)
    out, cut = limit_extent(probabilities, [1], {1: [(atlas, False)]}, 8.0, LabelDecision(), slack=0.1, length=LONGEST)
    assert allowed_slices([atlas], 8.0, 0.1, LONGEST) == 11  # ten slices, one more of slack
    first, last = cut[1]
    assert last - first + 1 == 11 and first <= 2 and last >= 11  # the heart whole, one slice to spare
    kept = decided(out) == 1
    assert not kept[last + 1:].any() and not kept[:first].any()
    assert (kept == (predicted == 1))[first:last + 1].all()  # nothing inside the window was touched
    assert kept[truth == 1].all()  # no slice of the organ is cut short
    assert out is not probabilities and probabilities[0, 16].any()  # the input is left as it was


def test_the_profile_is_read_in_the_query_slice_order():
    """An atlas whose slices run the other way: its profile reversed, the extra slices at the other end go."""
    atlas = label_profile(heart(13, 1, APEX_TO_BASE[::-1]), 1, slice_mm=8.0)  # base first in its own order
    predicted = heart(19, 2, APEX_TO_BASE + ATRIA)
    out, cut = limit_extent(predicted[None].astype(np.float32), [1], {1: [(atlas, True)]}, 8.0, LabelDecision(), 0.1, LONGEST)
    assert cut[1][0] <= 2 and cut[1][1] >= 11
    wrong, _ = limit_extent(predicted[None].astype(np.float32), [1], {1: [(atlas, False)]}, 8.0, LabelDecision(), 0.1, LONGEST)
    assert not np.array_equal(decided(wrong), decided(out))  # read the wrong way round, it would cut elsewhere


def test_a_label_within_its_allowed_extent_is_untouched_and_thin_atlases_allow_more_slices():
    atlas = label_profile(heart(13, 1, APEX_TO_BASE), 1, slice_mm=8.0)
    predicted = heart(19, 3, APEX_TO_BASE + [12])  # eleven slices: within ten + one
    probabilities = predicted[None].astype(np.float32)
    out, cut = limit_extent(probabilities, [1], {1: [(atlas, False)]}, 8.0, LabelDecision(), 0.1, LONGEST)
    assert out is probabilities and cut == {}
    assert allowed_slices([atlas], 4.0, 0.1, LONGEST) == 22  # 80 mm is twenty 4 mm slices, + 10 %
    assert allowed_slices([atlas, label_profile(heart(20, 0, [5] * 14), 1, 8.0)], 8.0, 0.1, LONGEST) == 15  # the longest atlas
    out, cut = limit_extent(probabilities, [1], {1: []}, 8.0, LabelDecision(), 0.1, LONGEST)  # no atlas holds it
    assert out is probabilities and cut == {}


def test_the_mean_length_allows_the_atlases_mean_extent_and_cuts_where_the_longest_would_not():
    """Atlases of 8, 10 and 12 slices: the longest allows 12 + 1 slices, their mean 10 + 1."""
    atlases = [label_profile(heart(14, 1, APEX_TO_BASE[-n:] if n <= 10 else [2, 2] + APEX_TO_BASE), 1, 8.0)
               for n in (8, 10, 12)]
    assert [len(a.areas) for a in atlases] == [8, 10, 12]
    assert allowed_slices(atlases, 8.0, 0.1, LONGEST) == 13
    assert allowed_slices(atlases, 8.0, 0.1, MEAN) == 11
    assert allowed_slices(atlases[:1], 8.0, 0.1, MEAN) == allowed_slices(atlases[:1], 8.0, 0.1, LONGEST) == 9
    assert allowed_slices(atlases, 4.0, 0.1, MEAN) == 22  # 80 mm on average is twenty 4 mm slices, + 10 %
    with pytest.raises(ValueError, match="length"):
        allowed_slices(atlases, 8.0, 0.1, "median")
    predicted = heart(19, 2, APEX_TO_BASE + ATRIA[:2])  # twelve slices: two over the atria
    probabilities = predicted[None].astype(np.float32)
    profiles = {1: [(a, False) for a in atlases]}
    out, cut = limit_extent(probabilities, [1], profiles, 8.0, LabelDecision(), 0.1, LONGEST)
    assert out is probabilities and cut == {}  # within the longest atlas's thirteen
    out, cut = limit_extent(probabilities, [1], profiles, 8.0, LabelDecision(), 0.1, MEAN)
    assert cut[1] == (2, 12)  # the heart (2-11) whole and one slice of atria: the other gone
    assert not (decided(out) == 1)[13:].any()


def test_several_labels_are_cut_each_to_its_own_atlases():
    ring, cavity = heart(19, 2, APEX_TO_BASE + ATRIA), heart(19, 4, [4, 6, 8, 9])
    mask = np.where(cavity == 1, 2, ring).astype(np.uint16)
    probabilities = np.stack([(mask == v).astype(np.float32) for v in (1, 2)])
    profiles = {1: [(label_profile(heart(13, 1, APEX_TO_BASE), 1, 8.0), False)],
                2: [(label_profile(heart(13, 1, [4, 6, 8, 9]), 1, 8.0), False)]}
    out, cut = limit_extent(probabilities, [1, 2], profiles, 8.0, LabelDecision(), 0.1, LONGEST)
    assert set(cut) == {1}  # the cavity spans its four slices: left alone
    assert np.array_equal(out[1], probabilities[1])


def test_best_window_follows_the_profile_and_prefers_the_earliest_of_equals():
    areas = np.array([1, 2, 3, 4, 5, 4, 3, 2, 1], float)
    assert best_window(areas, [np.array([1.0, 2, 3, 4, 5])], 5) == 0
    assert best_window(areas, [np.array([5.0, 4, 3, 2, 1])], 5) == 4
    assert best_window(np.ones(6), [np.array([1.0, 2, 3])], 3) == 0  # no shape to follow: the first window


def test_profiles_are_measured_once_per_atlas_content():
    mask = heart(13, 1, APEX_TO_BASE)
    atlas = Atlas(image_id="a", image=np.zeros(mask.shape, np.float32), mask=mask, spacing=(8.0, 1.25, 1.25),
                  components={1: 1}, key="k1")
    cache = ProfileCache()
    first = cache.of(atlas, 1)
    assert cache.of(atlas, 1) is first and cache.of(atlas, 2) is None
    changed = Atlas(image_id="a", image=atlas.image, mask=heart(13, 0, APEX_TO_BASE[:5]), spacing=atlas.spacing,
                    components={1: 1}, key="k2")
    assert len(cache.of(changed, 1).areas) == 5


def test_extent_settings_reject_what_they_cannot_run():
    from fewshot.transfer.atlas import AtlasTransfer

    good = load_preset("classic")["transfer"]
    for extent in ({"method": "oracle"}, {"method": "profile", "slack": -1}, {"method": "profile", "length": "median"},
                   {"method": "profile", "relative": "yes"}):
        with pytest.raises(ConfigError, match="extent"):
            AtlasTransfer({**good, "extent": extent})


def test_the_dev_scripts_extent_oracle_cuts_each_label_to_its_reference_slices():
    """scripts/atlas_dev.py --oracle-extent: what a perfect extent would give, and where each label runs past."""
    dev = load_script("atlas_dev")
    truth = np.zeros((6, 6, 8), np.uint8)  # file order: the slices are the last axis here
    truth[1:4, 1:4, 3:6] = 1
    truth[1:3, 4:6, 2:5] = 2
    label = truth.copy()
    label[1:4, 1:4, 1:3] = 1  # label 1 starts two slices early
    label[1:3, 4:6, 5] = 2  # label 2 ends one slice late
    dice, ends = dev.extent_oracle(label, truth, [1, 2, 3], axis=2)
    assert dice[1] == dice[2] == 1.0 and dice[3] == 0.0
    assert ends == {1: (-2, 0), 2: (0, 1), 3: None}
    label[2, 2, 4] = 0  # a miss inside the reference's slices stays a miss
    assert dev.extent_oracle(label, truth, [1], axis=2)[0][1] < 1.0


def ventricles(slices: int, wall: tuple[int, int], cavity: tuple[int, int]) -> np.ndarray:
    """A myocardium-like label (1) on slices wall[0]..wall[1] and a right-ventricle-like label (2) beside it
    on cavity[0]..cavity[1] (each (first, last), inclusive)."""
    mask = np.zeros((slices, SIZE, SIZE), np.uint16)
    mask[wall[0]:wall[1] + 1, 10:20, 10:20] = 1
    mask[cavity[0]:cavity[1] + 1, 25:40, 10:30] = 2
    return mask


def profiles_of(mask: np.ndarray, reversed_: bool = False, slice_mm: float = 8.0) -> AtlasProfiles:
    return AtlasProfiles({v: label_profile(mask, v, slice_mm) for v in (1, 2)}, reversed_)


def test_relative_ends_hold_a_label_where_the_atlases_end_it_against_another():
    """Atlases whose second label starts two slices (16 mm) after the first and ends on its last slice (a
    right ventricle against the myocardium): fused, it runs past both ends, and is held to them."""
    atlas = ventricles(14, (1, 10), (3, 10))
    assert end_offsets_mm(profiles_of(atlas), 2, 1) == (16.0, 0.0) and end_offsets_mm(profiles_of(atlas), 1, 2) == (-16.0, 0.0)
    assert end_offsets_mm(profiles_of(atlas, reversed_=True), 2, 1) == (0.0, 16.0)  # the query's ends, swapped
    fused = ventricles(16, (2, 11), (2, 13))  # two slices early at the apex, two late at the base
    probabilities = np.stack([(fused == v).astype(np.float32) for v in (1, 2)])
    out, cut = relative_ends(probabilities, [1, 2], [profiles_of(atlas)] * 3, 8.0, LabelDecision())
    assert cut == {2: (4, 11)}  # label 1 is left alone: the atlases end it past label 2 at the apex
    kept = decided(out)
    assert np.array_equal(np.nonzero((kept == 2).any(axis=(1, 2)))[0], np.arange(4, 12))
    assert np.array_equal(out[0], probabilities[0]) and (kept[4:12] == decided(probabilities)[4:12]).all()
    # The same atlases stored the other way round, and a query stack of 4 mm slices (16 mm: four slices)
    flipped = [profiles_of(atlas[::-1], reversed_=True)] * 3
    assert relative_ends(probabilities, [1, 2], flipped, 8.0, LabelDecision())[1] == {2: (4, 11)}
    assert relative_ends(probabilities, [1, 2], [profiles_of(atlas)] * 2, 4.0, LabelDecision())[1] == {2: (6, 11)}
    # One atlas cannot say how much the distance varies between patients: nothing is held
    assert relative_ends(probabilities, [1, 2], [profiles_of(atlas)], 8.0, LabelDecision())[0] is probabilities


def test_relative_ends_leave_alone_what_the_atlases_disagree_on_by_more_than_a_slice():
    """Organs apart (an abdomen's kidney against the liver's top): label 2 starts 2, 5 and 8 slices after label 1
    (16-64 mm, a standard deviation of 24 mm against 8 mm slices): no bound at that end, though every atlas
    starts it inside; at the other end they agree to the slice and it is held."""
    atlases = [profiles_of(ventricles(16, (1, 12), (1 + k, 12))) for k in (2, 5, 8)]
    fused = ventricles(16, (2, 13), (2, 15))
    probabilities = np.stack([(fused == v).astype(np.float32) for v in (1, 2)])
    assert relative_ends(probabilities, [1, 2], atlases, 8.0, LabelDecision())[1] == {2: (2, 13)}


def test_relative_ends_bound_only_where_most_atlases_agree_and_never_through_a_chain():
    """Label 2 ends past label 1 at the base in two of three atlases: no bound there (the apex still holds);
    label 1 is bounded by label 2 as it came in, not by label 2's cut."""
    past = ventricles(14, (1, 10), (3, 12))
    atlases = [profiles_of(past), profiles_of(past), profiles_of(ventricles(14, (1, 10), (3, 10)))]
    fused = ventricles(16, (2, 11), (2, 13))
    probabilities = np.stack([(fused == v).astype(np.float32) for v in (1, 2)])
    assert relative_ends(probabilities, [1, 2], atlases, 8.0, LabelDecision())[1] == {2: (4, 13)}
    level = [profiles_of(ventricles(14, (1, 10), (1, 10)))] * 2  # both labels span the same slices
    fused = ventricles(16, (2, 11), (4, 9))  # label 2 came out short: label 1 is held to it, label 2 is not moved
    probabilities = np.stack([(fused == v).astype(np.float32) for v in (1, 2)])
    out, cut = relative_ends(probabilities, [1, 2], level, 8.0, LabelDecision())
    assert cut == {1: (4, 9)} and np.array_equal(out[1], probabilities[1])
    apart = [profiles_of(ventricles(14, (1, 10), (3, 10)))] * 2  # label 2 starts two slices inside label 1 ...
    fused = ventricles(16, (8, 11), (2, 9))  # ... but label 1 came out starting at 8: label 2 would keep 10-9, nothing
    probabilities = np.stack([(fused == v).astype(np.float32) for v in (1, 2)])
    out, cut = relative_ends(probabilities, [1, 2], apart, 8.0, LabelDecision())
    assert 2 not in cut and np.array_equal(out[1], probabilities[1])  # a label is never emptied by another's end
    lone = [AtlasProfiles({1: label_profile(fused, 1, 8.0), 2: None}, False)]  # no atlas holds both: nothing to hold
    assert relative_ends(probabilities, [1, 2], lone, 8.0, LabelDecision())[0] is probabilities
