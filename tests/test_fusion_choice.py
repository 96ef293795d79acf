"""``transfer.fusion.correlation: bank``: joint fusion's search measure chosen by the bank's own atlases, each
left out in turn (transfer/fusion_choice.py). Here with a stand-in segmentation, so that what is chosen,
remembered and chosen again is exact; tests/test_atlas.py runs it through the real transfer."""
from __future__ import annotations

import numpy as np

from fewshot.transfer.fusion_choice import ALONE, FusionChoices, dice
from fewshot.types import Atlas


def atlas(image_id: str, key: str | None = None, value: int = 1) -> Atlas:
    mask = np.zeros((4, 8, 8), np.uint16)
    mask[1:3, 2:6, 2:6] = value
    return Atlas(image_id=image_id, image=np.zeros(mask.shape, np.float32), mask=mask, spacing=(5.0, 1.0, 1.0),
                 components={value: 1}, key=key or f"key-{image_id}")


class Segmenter:
    """Stands in for the transfer: correlation reproduces the left-out atlas's label, mean squares half of it."""

    def __init__(self, equal: bool = False):
        self.calls, self.equal = [], equal

    def __call__(self, left_out: Atlas, others: list[Atlas], correlation: bool) -> np.ndarray:
        self.calls.append((left_out.image_id, tuple(a.image_id for a in others), correlation))
        out = left_out.mask.copy()
        if not correlation and not self.equal:
            out[:, :, 4:] = 0
        return out


def test_the_measure_that_segments_the_left_out_atlases_better_is_chosen_and_remembered():
    choices, segment = FusionChoices(), Segmenter()
    bank = [atlas("b"), atlas("a"), atlas("c")]
    choice = choices.choose(bank, (1,), "settings", limit=8, segment=segment)
    assert choice.correlation is True and choice.name == "correlation"
    assert choice.atlases == ("a", "b", "c") and choice.seconds >= 0
    assert choice.dice[True] == 1.0 and abs(choice.dice[False] - 2 / 3) < 1e-9
    # each atlas left out once, segmented by all the others, both ways
    assert sorted(segment.calls) == sorted((x, tuple(y for y in "abc" if y != x), m) for x in "abc" for m in (False, True))
    again = choices.choose(list(reversed(bank)), (1,), "settings", limit=8, segment=segment)
    assert again.correlation is True and again.seconds == 0.0 and len(segment.calls) == 6  # remembered
    # a changed label (its atlas's key), other labels or other settings choose again
    choices.choose([atlas("a", "new"), atlas("b"), atlas("c")], (1,), "settings", limit=8, segment=segment)
    choices.choose(bank, (1, 2), "settings", limit=8, segment=segment)
    choices.choose(bank, (1,), "other settings", limit=8, segment=segment)
    assert len(segment.calls) == 24
    choices.clear()
    choices.choose(bank, (1,), "settings", limit=8, segment=segment)
    assert len(segment.calls) == 30


def test_a_lone_atlas_or_a_tie_takes_the_lone_measure_and_at_most_limit_atlases_are_left_out():
    choices = FusionChoices()
    lone = Segmenter()
    choice = choices.choose([atlas("a")], (1,), "s", limit=8, segment=lone)
    assert choice.correlation is ALONE is True and lone.calls == [] and choice.dice == {}
    tie = Segmenter(equal=True)
    assert choices.choose([atlas("a"), atlas("b")], (1,), "s", limit=8, segment=tie).correlation is ALONE
    better = FusionChoices().choose([atlas("a"), atlas("b")], (1,), "s", limit=8,
                                    segment=lambda a, others, correlation: Segmenter()(a, others, not correlation))
    assert better.correlation is False  # mean squares segments better here: it is chosen and better.dice[False] == 1.0
    limited = Segmenter()
    choice = FusionChoices().choose([atlas(x) for x in "dcba"], (1,), "s", limit=2, segment=limited)
    assert choice.atlases == ("a", "b") and {c[0] for c in limited.calls} == {"a", "b"}
    assert all(len(others) == 1 for _, others, _ in limited.calls)


def test_dice_scores_only_the_labels_the_left_out_atlas_holds():
    truth = atlas("a").mask
    assert dice(truth, truth, (1, 2)) == 1.0  # label 2 is in neither: not scored
    assert dice(np.zeros_like(truth), truth, (1,)) == 0.0
    assert np.isnan(dice(truth, np.zeros_like(truth), (1,)))
