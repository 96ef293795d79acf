"""A label runs along the slices no further than its atlases say it can.

On thick-slice stacks the affine stages may stretch an atlas along z to fill a query stack longer
than its own: slices 8 mm apart say little about scale along z, and the mutual information of the
whole field of view rewards covering it. On MS-CMRSeg the global affine stretches atlases 1.1-1.8x
along z while it scales them in plane by 0.94-1.26, the local affine up to 2x more, and an atlas's
ten labelled slices come out over seventeen: its ventricles drawn over the query's atria, four to
six slices past the base. When every atlas is stretched alike, fusion has nothing to vote against it.

So each label's extent after fusion (from its first slice to its last) may be at most the longest
extent of that label among the atlases used (``length: longest``), or their mean (``length: mean``),
converted to the query's slices, plus ``slack`` of it (at least one slice: the through-plane
uncertainty the slice-shifted votes already allow). The longest atlas bounds what any atlas has
seen; the mean is the better guess of the query's own extent once there are several, and cuts
where the longest lets a stretched label keep two or three slices of atria. A longer
label keeps the window of that length whose per-slice areas best follow the atlases' own area
profiles (mean correlation; each profile in the query's slice order, stretched to the window): a
heart tapers to its apex and ends broad at its base, a liver tapers at its tip. Slices inside the
window are never touched, so an organ longer than the allowance keeps that much of itself.

With ``relative: true`` each label's ends are also held where the atlases place them against the other
labels' ends (``relative_ends``). On short-axis stacks the labels end on the same base slice (the
convention of who drew them), and the right ventricle stops before the myocardium's apex; after
registration and the slice-shifted votes the fused right ventricle runs a slice or two past both. So at
an end where most atlases end label A level with or inside label B, and at least two atlases agree on
the distance to within a query slice (its standard deviation), A may not end further out than the fused
B, less the atlases' mean distance between the two ends (rounded to query slices). Separate organs are
left alone: between an abdomen's liver, kidneys and spleen the distances vary by 14-33 mm (2-4 slices)
between patients, and holding them cost CHAOS 6-14 Dice points (docs/results.md). Bounds are taken from
the labels as they come in, never from each other's cuts, so one label's error does not travel through
a chain of them.

Profiles are measured once per atlas content (``Atlas.key``) and kept for later queries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from fewshot.decision import LabelDecision
from fewshot.transfer.atlas_measures import AtlasLabelCache
from fewshot.transfer.atlas_registration import correlation

METHODS = ("profile", "none")
LONGEST, MEAN = "longest", "mean"  # the atlases' extent a label may span: their longest, or their mean
LENGTHS = (LONGEST, MEAN)


@dataclass(frozen=True)
class ExtentSettings:
    method: str  # "profile" (limit and place each label's extent as above) or "none"
    slack: float  # extent allowed beyond the atlases', as a fraction of it (at least one slice)
    length: str = MEAN  # LONGEST or MEAN of the atlases' extents (MEAN won nested selection: docs/results.md)
    relative: bool = False  # also hold each label's ends against the other labels' (``relative_ends``)

    @classmethod
    def from_settings(cls, raw: Mapping | None) -> "ExtentSettings":
        raw = raw or {}
        return cls(method=str(raw.get("method", "none")), slack=float(raw.get("slack", 0.1)),
                   length=str(raw.get("length", MEAN)), relative=raw.get("relative", False))  # checked by AtlasSettings


@dataclass(frozen=True)
class Profile:
    """One atlas's label along its slices: pixel counts from its first labelled slice to its last."""

    areas: np.ndarray  # (n,) float
    slice_mm: float  # the atlas's slice spacing
    first: int = 0  # the atlas's slice the areas start on (its own order)

    @property
    def last(self) -> int:
        return self.first + len(self.areas) - 1

    @property
    def length_mm(self) -> float:
        return len(self.areas) * self.slice_mm


def label_profile(mask: np.ndarray, value: int, slice_mm: float) -> Profile | None:
    """``value``'s per-slice pixel counts in ``mask`` (z, y, x) over its extent; None when absent."""
    areas = (np.asarray(mask) == value).sum(axis=(1, 2)).astype(np.float64)
    present = np.nonzero(areas)[0]
    if not len(present):
        return None
    return Profile(areas=areas[present[0]:present[-1] + 1], slice_mm=float(slice_mm), first=int(present[0]))


class ProfileCache(AtlasLabelCache[Profile | None]):
    """Per-atlas label profiles, measured once per atlas content (``Atlas.key``)."""

    def __init__(self) -> None:
        super().__init__(lambda atlas, value: label_profile(atlas.mask, value, float(atlas.spacing[0])))


def _stretched(areas: np.ndarray, n: int) -> np.ndarray:
    return np.interp(np.linspace(0.0, len(areas) - 1.0, n), np.arange(len(areas)), areas)


def best_window(areas: np.ndarray, profiles: Sequence[np.ndarray], length: int) -> int:
    """Start of the ``length``-slice window of ``areas`` (a label's per-slice area in the query)
    whose areas correlate best, on average, with ``profiles`` (the atlases', in the query's slice
    order); the earliest of equals."""
    shapes = [_stretched(p, length) for p in profiles]
    scores = [np.mean([correlation(areas[s:s + length], shape) for shape in shapes])
              for s in range(len(areas) - length + 1)]
    return int(np.argmax(scores))


def allowed_slices(profiles: Sequence[Profile], query_slice_mm: float, slack: float, length: str) -> int:
    """How many query slices a label may span: the atlases' extent (their longest, or their mean)
    plus ``slack`` of it, at least one slice more."""
    lengths = [p.length_mm / query_slice_mm for p in profiles]
    if length not in LENGTHS:
        raise ValueError(f"extent length must be one of {list(LENGTHS)}, not {length!r}")
    extent = max(lengths) if length == LONGEST else float(np.mean(lengths))
    return int(np.floor(extent + max(1.0, slack * extent) + 1e-6))


def limit_extent(probabilities: np.ndarray, labels: Sequence[int], profiles: Mapping[int, Sequence[tuple[Profile, bool]]],
                 query_slice_mm: float, decision: LabelDecision, slack: float,
                 length: str) -> tuple[np.ndarray, dict[int, tuple[int, int]]]:
    """probabilities (L, z, y, x) -> the same with each label cleared on the slices outside the
    window it may span, and label value -> (first, last) slice kept, for the labels cut.

    ``profiles``: label value -> (profile, reversed) per atlas used for it; ``reversed`` when that
    atlas's slices run opposite to the query's (``GlobalAlignment.reversed_slices``)."""
    decided = decision.decide(probabilities)
    out, cut = probabilities, {}
    for c, value in enumerate(labels):
        found = [(p, rev) for p, rev in profiles.get(int(value), ()) if p is not None]
        present = np.nonzero((decided == c).any(axis=(1, 2)))[0]
        if not found or not len(present):
            continue
        first, last = int(present[0]), int(present[-1])
        allowed = allowed_slices([p for p, _ in found], query_slice_mm, slack, length)
        if last - first + 1 <= allowed:
            continue
        areas = (decided[first:last + 1] == c).sum(axis=(1, 2)).astype(np.float64)
        shapes = [p.areas[::-1] if rev else p.areas for p, rev in found]
        start = first + best_window(areas, shapes, allowed)
        if out is probabilities:
            out = probabilities.copy()
        out[c, :start] = 0.0
        out[c, start + allowed:] = 0.0
        cut[int(value)] = (start, start + allowed - 1)
    return out, cut


@dataclass(frozen=True)
class AtlasProfiles:
    """One atlas's profiles, label value -> Profile (None: absent), and whether its slices run opposite
    to the query's."""

    profiles: Mapping[int, Profile | None]
    reversed: bool


def end_offsets_mm(atlas: AtlasProfiles, a: int, b: int) -> tuple[float, float] | None:
    """How far label ``a`` ends inside label ``b`` in this atlas, in mm, at the query's (first, last)
    end: positive inside, negative past it; None when the atlas lacks either."""
    pa, pb = atlas.profiles.get(a), atlas.profiles.get(b)
    if pa is None or pb is None:
        return None
    low, high = (pa.first - pb.first) * pa.slice_mm, (pb.last - pa.last) * pa.slice_mm
    return (high, low) if atlas.reversed else (low, high)


def relative_ends(probabilities: np.ndarray, labels: Sequence[int], atlases: Sequence[AtlasProfiles],
                  query_slice_mm: float, decision: LabelDecision) -> tuple[np.ndarray, dict[int, tuple[int, int]]]:
    """probabilities (L, z, y, x) -> the same with each label cleared beyond the ends the other labels
    allow it (module docstring), and label value -> (first, last) slice kept, for the labels cut.

    At its first (last) end label A may start no earlier (end no later) than label B's fused end moved
    inwards by the atlases' mean offset between the two ends, where more than half of the atlases
    holding both put A's end level with B's or inside it and at least two of them agree on that offset
    to within a query slice (standard deviation)."""
    decided = decision.decide(probabilities)
    present = {}
    for c, value in enumerate(labels):
        z = np.nonzero((decided == c).any(axis=(1, 2)))[0]
        if len(z):
            present[int(value)] = (int(z[0]), int(z[-1]))
    out, cut = probabilities, {}
    for c, value in enumerate(labels):
        a = int(value)
        if a not in present:
            continue
        first, last = present[a]
        for b, (b_first, b_last) in present.items():
            offsets = [o for o in (end_offsets_mm(atlas, a, b) for atlas in atlases) if o is not None] if b != a else []
            if not offsets:
                continue
            for end, mm in enumerate(np.asarray(offsets, np.float64).T):
                if (mm >= 0).mean() <= 0.5 or len(mm) < 2 or float(np.std(mm, ddof=1)) > query_slice_mm:
                    continue
                inwards = int(np.floor(max(0.0, float(mm.mean())) / query_slice_mm + 0.5))
                if end == 0:
                    first = max(first, b_first + inwards)
                else:
                    last = min(last, b_last - inwards)
        if (first, last) == present[a] or first > last:  # bounds that would leave nothing are not trusted
            continue
        if out is probabilities:
            out = probabilities.copy()
        out[c, :max(first, 0)] = 0.0
        out[c, max(last + 1, 0):] = 0.0
        cut[a] = (first, last)
    return out, cut
