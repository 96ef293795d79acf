"""How many separate 3D pieces each label has, and keeping that many in a prediction.

A label may legitimately have several pieces: both kidneys saved as one `kidney` label, lung lobes,
a vessel cut twice by the field of view. Keeping only the largest connected component per label
throws the others away (the phantoms' second kidney, always). So each atlas records, when its label
is saved, how many *sizeable* pieces each label has (at least ``MIN_FRACTION`` of its largest one:
a stray voxel of an annotation is not a piece), and a prediction keeps, per label, as many of its
largest pieces as the atlases used for it say (their median). Specks of a label elsewhere go.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from fewshot.decision import LabelDecision

MIN_FRACTION = 0.1  # a piece counts when it has at least this fraction of its label's largest piece's voxels
_STRUCTURE = np.ones((3, 3, 3), bool)  # pieces touch across faces, edges or corners


def _sizes(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labelled, count = ndimage.label(binary, structure=_STRUCTURE)
    return labelled, np.bincount(labelled.ravel(), minlength=count + 1)[1:]


def count_pieces(mask: np.ndarray, labels: Sequence[int] | None = None) -> dict[int, int]:
    """label value -> number of sizeable 3D pieces, for every label present in ``mask``."""
    values = labels if labels is not None else [int(v) for v in np.unique(mask) if v]
    out = {}
    for value in values:
        _, sizes = _sizes(mask == value)
        if len(sizes):
            out[int(value)] = int((sizes >= MIN_FRACTION * sizes.max()).sum())
    return out


def expected_pieces(counts: Sequence[Mapping[int, int]], value: int) -> int:
    """The median number of pieces of ``value`` among the atlases that have it (at least 1)."""
    seen = sorted(c[value] for c in counts if c.get(value))
    return max(1, int(np.ceil(np.median(seen)))) if seen else 1


def keep_pieces(probabilities: np.ndarray, labels: Sequence[int], expected: Mapping[int, int],
                decision: LabelDecision) -> np.ndarray:
    """probabilities (L, z, y, x) -> the same with each label zeroed outside its ``expected[label]``
    largest pieces of the label map ``decision`` makes of them."""
    out = probabilities.copy()
    decided = decision.decide(probabilities)
    for c, value in enumerate(labels):
        labelled, sizes = _sizes(decided == c)
        if len(sizes) <= expected.get(value, 1):
            continue
        keep = np.argsort(sizes)[::-1][: expected.get(value, 1)] + 1
        out[c][(labelled > 0) & ~np.isin(labelled, keep)] = 0.0
    return out
