"""Per-label probabilities -> one label per voxel: the one rule every step of a segmentation shares.

The transfer steps hand over (L, ...) probabilities, one channel per label, but they mean different
things. SAM 2 runs each label as its own object: its channels are independent (each a sigmoid), so a
voxel is labelled where its most probable label passes a threshold (``threshold``). Label fusion
votes one label per voxel: its channels are shares of one distribution whose remainder,
1 - sum, is background. There a threshold on the largest share is wrong where three labels meet:
a myocardium voxel voted 0.45 myocardium, 0.45 blood pool and 0.1 background is, by 0.9 of the
vote, not background, yet no single share passes 0.5, so it became background, a hole in a thin
ring. ``distribution`` takes the most probable of background and labels; ``foreground`` first asks
whether the voxel is foreground at all (sum > threshold), then which label (labels nested in one
another, as the blood pool in the myocardium's ring, share their boundary votes).

Post-processing (pieces, shape) and the final label map decide with the same rule, so a label map
never disagrees with the steps that shaped it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RULES = ("threshold", "distribution", "foreground")


@dataclass(frozen=True)
class LabelDecision:
    threshold: float = 0.5  # ``threshold``: a label's probability; ``foreground``: the labels' sum
    rule: str = "threshold"  # one of RULES

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"label decision rule {self.rule!r} must be one of {', '.join(RULES)}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"label decision threshold {self.threshold} must lie in (0, 1)")

    def decide(self, probabilities: np.ndarray) -> np.ndarray:
        """(L, ...) probabilities -> (...) int index of the chosen channel, -1 for background."""
        p = np.asarray(probabilities, np.float32)
        if not len(p):
            return np.full(p.shape[1:], -1, np.int64)
        best = p.argmax(axis=0)
        if self.rule == "threshold":
            labelled = p.max(axis=0) > self.threshold
        elif self.rule == "distribution":
            total = p.sum(axis=0)
            labelled = p.max(axis=0) > 1.0 - total  # the most probable label beats the remainder
        else:
            labelled = p.sum(axis=0) > self.threshold
        return np.where(labelled, best, -1)
