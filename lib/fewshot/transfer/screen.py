"""Atlases that registered badly are left out of the fusion: a check after registration.

Atlas selection ranks atlases after a global affine, before the costly stages; everything the bank
holds is registered while it holds ``selection.keep`` or fewer. But an atlas can look as good as
another after a global affine and still fail to register: on CHAOS, scan 22 and scan 19 correlate
alike with query 1 after the affine (0.647 against 0.642 within their structures), yet scan 22
alone segments it at 0.513 Dice and scan 19 at 0.825, and fused together they give 0.652 (the
random order that added 22 second fell 7.3 points, docs/results.md, "Past eight labelled scans").
With two atlases joint fusion cannot out-vote the bad one: each atlas is half of every local
weight's evidence.

After the whole registration the two separate: the registered atlas's intensities correlate with
the query's within its structures (dilated by ``RIM_MM``, where a misplaced boundary shows) at 0.742
for scan 22 against 0.868 for scan 19 on query 1, and 0.633 against 0.742 on query 15. So, with
``margin`` set, an atlas whose correlation falls more than ``margin`` below the best atlas's is left
out of the fusion (Aljabar et al. 2009 select after non-rigid registration for the same reason). An
atlas that is the last holder of a label is never left out, and one whose structures vanished (no
score) is kept: nothing says it failed.

Each atlas is scored over its own structures: atlases that hold different labels are compared over
different regions. With the default (two atlases at most) that is two scans' own label sets; a bank
whose scans label different structures may want the screen off.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from fewshot.config import ConfigError
from fewshot.settings import number_or_none
from fewshot.transfer.atlas_registration import correlation, margin_voxels

RIM_MM = 5.0  # the structures' surroundings the correlation is taken over: about 4 pixels in plane, one thick slice


@dataclass(frozen=True)
class ScreenSettings:
    # An atlas whose registered correlation with the query falls more than this below the best atlas's
    # is left out of the fusion; None: every registered atlas is fused.
    margin: float | None
    # The screen runs only when at most this many atlases were registered for the query (None: however many).
    # Joint fusion weighs a badly registered atlas down locally, and with many atlases that outvotes it; with
    # two it is half of every vote. On CMR's growth curves the screen at every bank size cost 1.3 points at 4
    # atlases and 0.6 at 8, where it left out up to 7 of 8 (docs/results.md, "A screen after registration").
    max_atlases: int | None = None

    @classmethod
    def from_settings(cls, raw: Mapping | None) -> "ScreenSettings":
        if raw is None:
            return cls(None, None)
        if not isinstance(raw, Mapping):
            raise ConfigError(f"transfer.screen must be a section with margin and max_atlases, not {raw!r}")
        unknown = sorted(set(raw) - {"margin", "max_atlases"})
        if unknown:
            raise ConfigError(f"transfer.screen has no setting {unknown}: margin, max_atlases")
        return cls(margin=number_or_none(raw.get("margin"), float, "transfer.screen.margin"),
                   max_atlases=number_or_none(raw.get("max_atlases"), int, "transfer.screen.max_atlases"))


def registered_similarity(query_box: np.ndarray, image: np.ndarray, probabilities: np.ndarray,
                          spacing: Sequence[float]) -> float | None:
    """Pearson correlation of a registered atlas's intensities (``image``, z, y, x) with the query's
    (``query_box``, the same box) over its structures (``probabilities`` (L, z, y, x) above 0.5 for
    any label) dilated by ``RIM_MM``; None when its structures left the box or a side is flat there."""
    structures = np.asarray(probabilities).max(axis=0) > 0.5
    if not structures.any():
        return None
    inside = ndimage.maximum_filter(structures, size=[2 * p + 1 for p in margin_voxels(spacing, RIM_MM)])
    q, a = np.asarray(query_box)[inside], np.asarray(image)[inside]
    if q.min() == q.max() or a.min() == a.max():  # no contrast on a side: no score, rather than correlation's 0
        return None
    return correlation(q, a)


def screened(scores: Mapping[str, float | None], holds: Mapping[str, set[int]], settings: ScreenSettings) -> set[str]:
    """The atlases (by id) left out: their ``scores`` (one per registered atlas) more than ``settings.margin``
    below the best, unless one is the last holder of a label (``holds``: id -> labels it holds) or has no
    score; none when more than ``settings.max_atlases`` were registered."""
    known = {i: s for i, s in scores.items() if s is not None}
    margin = settings.margin
    if margin is None or len(known) < 2 or (settings.max_atlases is not None and len(scores) > settings.max_atlases):
        return set()
    best = max(known.values())
    out = {i for i, s in known.items() if s < best - margin}
    for i in sorted(out, key=lambda i: -known[i]):  # the better of two failing holders returns first
        kept_labels = set().union(*(holds[j] for j in scores if j not in out))
        if holds[i] - kept_labels:
            out.discard(i)
    return out
