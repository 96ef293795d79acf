"""Joint fusion's search measure, chosen by the bank's own atlases (``transfer.fusion.correlation: bank``).

The search can compare patches by mean squares or by correlation (ANTs' PC, blind to a local intensity
scale). Nested selection chose correlation on cardiac bSSFP in every group (CMR 3 / 5 shots) and mean
squares on abdominal T2 in every group (CHAOS 3 shots): neither is right for every kind of scan, and a
clinic's scans are its own (docs/results.md, "Joint fusion's search by correlation, and the measure chosen
by the bank"). So each atlas in
turn is segmented by the others, both ways, and the measure whose labels agree better with the atlases'
own (mean Dice over the left-out atlases and their labels) serves the bank's queries: nested selection,
run by the app on the user's labels. The two ways share every registration (only the fusion differs), and
the registrations are cached like a query's, so a new label registers only its own pairs.

A bank of one atlas has nothing to leave out: it fuses by correlation (``ALONE``), which nested selection
chose at one labelled scan on cardiac MRI in every group (80.5 against 78.8) and which tied on the abdomen
(73.5 against 73.6 on five scans). On a tie the same measure wins. The choice is kept per bank content (the
atlases' keys), labels and settings.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from fewshot.eval.metrics import dice as overlap
from fewshot.types import Atlas

logger = logging.getLogger(__name__)

ALONE = True  # the measure of a bank too small to choose, and of a tie (True: correlation)
MEASURES = (False, True)  # correlation off (mean squares), on
KEPT = 64  # choices remembered (banks x label sets x settings)


@dataclass(frozen=True)
class MeasureChoice:
    correlation: bool  # the measure chosen
    dice: dict  # measure -> mean Dice of the left-out atlases' labels ({} when nothing was left out)
    atlases: tuple[str, ...]  # the atlases left out in turn
    seconds: float  # what choosing took (0 when remembered)

    @property
    def name(self) -> str:
        return "correlation" if self.correlation else "mean squares"


def dice(predicted: np.ndarray, truth: np.ndarray, labels: Sequence[int]) -> float:
    """Mean Dice over ``labels`` the truth holds (a label neither holds is not scored)."""
    scores = [overlap(predicted == v, truth == v) for v in labels if (truth == v).any()]
    return float(np.mean(scores)) if scores else float("nan")


class FusionChoices:
    """The measure per bank, chosen by leaving each atlas out (at most ``limit`` of them, in image id order)."""

    def __init__(self):
        self._chosen: dict[str, MeasureChoice] = {}
        self._lock = threading.Lock()  # one choice computed at a time: two queries of a new bank wait for one

    def clear(self) -> None:
        with self._lock:
            self._chosen.clear()

    def choose(self, atlases: Sequence[Atlas], labels: Sequence[int], settings_key: str, limit: int,
               segment: Callable[[Atlas, list[Atlas], bool], np.ndarray]) -> MeasureChoice:
        """``segment(atlas, others, correlation)``: the atlas's label map (its canvas) fused from the others."""
        left_out = sorted(atlases, key=lambda a: a.image_id)[:max(2, int(limit))]
        labels = tuple(sorted(int(v) for v in labels))
        if len(left_out) < 2:
            return MeasureChoice(ALONE, {}, (), 0.0)
        key = hashlib.sha256(json.dumps([sorted(a.key for a in left_out), labels, settings_key]).encode()).hexdigest()
        with self._lock:
            known = self._chosen.get(key)
            if known is not None:
                return MeasureChoice(known.correlation, known.dice, known.atlases, 0.0)
            clock = time.perf_counter()
            scores: dict[bool, list[float]] = {m: [] for m in MEASURES}
            for n, atlas in enumerate(left_out, 1):
                others = [a for a in left_out if a is not atlas]
                for measure in MEASURES:
                    scores[measure].append(dice(segment(atlas, others, measure), atlas.mask, labels))
                logger.info("fusion measure: atlas %s left out (%d/%d): Dice %.3f by mean squares, %.3f by correlation",
                            atlas.image_id, n, len(left_out), scores[False][-1], scores[True][-1])
            means = {m: float(np.nanmean(s)) if np.isfinite(s).any() else float("nan") for m, s in scores.items()}
            # on a tie (or nothing scored) the measure of a lone atlas
            decided = all(np.isfinite(list(means.values()))) and means[True] != means[False]
            correlation = bool(means[True] > means[False]) if decided else ALONE
            choice = MeasureChoice(correlation, means, tuple(a.image_id for a in left_out), time.perf_counter() - clock)
            logger.info("fusion measure for this bank: %s (atlases %s left out in turn: mean Dice %.3f by mean squares, "
                        "%.3f by correlation; %.1f s)", choice.name, list(choice.atlases), means[False], means[True],
                        choice.seconds)
            self._chosen[key] = choice
            while len(self._chosen) > KEPT:
                self._chosen.pop(next(iter(self._chosen)))
            return choice
