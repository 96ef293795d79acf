"""The screen after registration (transfer/screen.py): its measure and its rule, without a registration."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from fewshot.config import ConfigError
from fewshot.transfer.screen import ScreenSettings, registered_similarity, screened

SPACING = (6.0, 1.5, 1.5)


def _scan(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(6, 64, 64) smooth texture and one organ's probabilities (1, 6, 64, 64) on slices 1-4."""
    image = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal((6, 64, 64)), (0, 3, 3)).astype(np.float32)
    organ = np.zeros((1, 6, 64, 64), np.float16)
    organ[0, 1:5, 20:40, 24:44] = 1
    return image, organ


def test_an_atlas_on_the_query_scores_one_and_a_misplaced_one_less():
    query, organ = _scan()
    assert registered_similarity(query, query.astype(np.float16), organ, SPACING) == pytest.approx(1.0, abs=1e-3)
    moved = np.roll(query, 6, axis=2)  # 9 mm off in plane
    off = registered_similarity(query, moved, organ, SPACING)
    assert off < 0.8
    # the score is taken over the structures and their 5 mm rim, not the whole box: outside it nothing counts
    rim = ndimage.maximum_filter(organ[0] > 0.5, size=(3, 9, 9))
    elsewhere = np.where(rim, moved, np.random.default_rng(5).standard_normal(query.shape)).astype(np.float32)
    assert registered_similarity(query, elsewhere, organ, SPACING) == pytest.approx(off, abs=1e-6)


def test_no_score_without_structures_or_contrast():
    query, organ = _scan()
    assert registered_similarity(query, query, np.zeros_like(organ), SPACING) is None
    assert registered_similarity(query, np.zeros_like(query), organ, SPACING) is None  # outside the atlas's data


def _margin(margin, max_atlases=None) -> ScreenSettings:
    return ScreenSettings(margin, max_atlases)


def test_the_screen_leaves_out_only_atlases_far_below_the_best():
    holds = {"a": {1, 2}, "b": {1, 2}, "c": {1, 2}}
    scores = {"a": 0.87, "b": 0.84, "c": 0.76}
    assert screened(scores, holds, _margin(None)) == set()
    assert screened(scores, holds, _margin(0.05)) == {"c"}
    assert screened(scores, holds, _margin(0.2)) == set()
    assert screened(scores, holds, _margin(0.0)) == {"b", "c"}
    assert screened({"a": 0.9, "b": None, "c": 0.5}, holds, _margin(0.05)) == {"c"}  # no score: nothing says it failed
    assert screened({"a": 0.9, "b": None}, holds, _margin(0.05)) == set()  # one score is no comparison


def test_the_screen_runs_only_on_as_few_atlases_as_it_is_told():
    holds = {"a": {1}, "b": {1}, "c": {1}}
    assert screened({"a": 0.9, "b": 0.6}, holds, _margin(0.05, 2)) == {"b"}
    assert screened({"a": 0.9, "b": 0.6, "c": 0.8}, holds, _margin(0.05, 2)) == set()  # three registered
    assert screened({"a": 0.9, "b": 0.6, "c": None}, holds, _margin(0.05, 2)) == set()  # unscored ones count too
    assert screened({"a": 0.9, "b": 0.6, "c": 0.8}, holds, _margin(0.05, 3)) == {"b", "c"}


def test_the_last_holder_of_a_label_is_never_left_out():
    holds = {"a": {1}, "b": {1, 2}, "c": {2}}
    # b and c both fail, c's label 2 needs one of them back: the better, b
    assert screened({"a": 0.9, "b": 0.7, "c": 0.6}, holds, _margin(0.05)) == {"c"}
    assert screened({"a": 0.9, "b": 0.6, "c": 0.7}, holds, _margin(0.05)) == {"b"}
    assert screened({"a": 0.9, "c": 0.1}, {"a": {1}, "c": {2}}, _margin(0.05)) == set()


def test_the_margin_is_read_and_checked():
    assert ScreenSettings.from_settings(None).margin is None
    assert ScreenSettings.from_settings({"margin": "none"}).margin is None
    assert ScreenSettings.from_settings({"margin": 0.05}) == ScreenSettings(0.05, None)
    assert ScreenSettings.from_settings({"margin": 0.05, "max_atlases": 2}) == ScreenSettings(0.05, 2)
    with pytest.raises(ConfigError, match="transfer.screen.margin must be a number or none"):
        ScreenSettings.from_settings({"margin": "small"})
    assert ScreenSettings.from_settings({"margin": "0.05", "max_atlases": "2"}) == ScreenSettings(0.05, 2)  # --set strings
    for count in (2.5, "two", True, "2.5"):
        with pytest.raises(ConfigError, match="transfer.screen.max_atlases must be a whole number or none"):
            ScreenSettings.from_settings({"margin": 0.05, "max_atlases": count})
    for off in (False, True):  # yaml's false / off / no: float() would make false the harshest screen, 0
        with pytest.raises(ConfigError, match="transfer.screen.margin must be a number or none"):
            ScreenSettings.from_settings({"margin": off})
    with pytest.raises(ConfigError, match=r"transfer.screen has no setting \['margn'\]"):
        ScreenSettings.from_settings({"margn": 0.05})
    with pytest.raises(ConfigError, match="transfer.screen must be a section"):
        ScreenSettings.from_settings("none")
