"""Labels that every atlas draws convex in plane come out convex in plane.

Registration and patch fusion follow intensities. Inside the left ventricle's blood pool the
papillary muscles and trabeculae are as dark as the myocardium, so the fused labels hand them to
the myocardium and the cavity comes out ragged; yet every atlas draws the cavity as one smooth,
convex disc per short-axis slice that includes them (the datasets' convention, and the
cardiologists'). The atlases say which labels behave like that: per label, the *solidity* of its
pieces in each slice (pixel count over that of their convex hull, through pixel centres) averages
0.998 for the blood pool, 0.47 for the myocardial ring and 0.82 for the right ventricle's crescent
on MS-CMRSeg; 0.98 for the kidneys, 0.91 for the liver and 0.88 for the spleen on CHAOS; 0.92-0.94
for the hippocampus on MSD (15 scans each).

So a label whose mean solidity in the atlases used is at least ``min_solidity`` is made convex in
each slice of the query, one 2D piece at a time (two pieces in a slice, such as both kidneys under
one label, are never bridged): inside the piece's convex hull it takes over the voxels that went to
*another label* that is not convex itself. Background inside the hull stays background, because a real notch (the renal
hilum) is background in the atlases too; another structure inside a convex one is what intensity
look-alikes produce.

Solidities are measured once per atlas (keyed by its content hash) and kept for later queries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage
from skimage.morphology import convex_hull_image

from fewshot.decision import LabelDecision
from fewshot.settings import number_or_none
from fewshot.transfer.atlas_measures import AtlasLabelCache
from fewshot.types import Atlas

MIN_AREA_MM2 = 50.0  # pieces smaller than this in a slice (specks, an organ's tip) have no telling shape
_PLANE = np.ones((3, 3), bool)  # 8-connected pieces in a slice


@dataclass(frozen=True)
class ShapeSettings:
    # Labels whose atlases' in-plane pieces have at least this mean solidity are made convex per
    # slice; None turns the step off.
    min_solidity: float | None

    @classmethod
    def from_settings(cls, raw: Mapping | None) -> "ShapeSettings":
        return cls(min_solidity=number_or_none((raw or {}).get("min_solidity"), float, "transfer.shape.min_solidity"))


def _pieces(binary: np.ndarray, min_pixels: int):
    labelled, count = ndimage.label(binary, structure=_PLANE)
    for index, piece in enumerate(ndimage.find_objects(labelled), start=1):
        mask = labelled[piece] == index
        if mask.sum() >= min_pixels:
            yield piece, mask


def solidity(mask: np.ndarray, value: int, pixel_area_mm2: float) -> float | None:
    """Mean solidity of ``value``'s in-plane pieces over the slices of ``mask`` (z, y, x); None when
    no piece is large enough to have a shape."""
    min_pixels = max(1, int(np.ceil(MIN_AREA_MM2 / pixel_area_mm2)))
    found = []
    for z in range(mask.shape[0]):
        for piece, binary in _pieces(mask[z] == value, min_pixels):
            found.append(binary.sum() / convex_hull_image(binary, offset_coordinates=False).sum())
    return float(np.mean(found)) if found else None


class SolidityCache(AtlasLabelCache[float | None]):
    """Per-atlas label solidities, measured once per atlas content (``Atlas.key``)."""

    def __init__(self) -> None:
        super().__init__(lambda atlas, value: solidity(np.asarray(atlas.mask), value,
                                                       float(atlas.spacing[1] * atlas.spacing[2])))

    def convex_labels(self, atlases: Sequence[Atlas], labels: Sequence[int], min_solidity: float | None) -> list[int]:
        """The labels whose median solidity over the atlases holding them reaches ``min_solidity``."""
        if min_solidity is None:
            return []
        out = []
        for value in labels:
            seen = [s for s in (self.of(a, value) for a in atlases if value in a.components) if s is not None]
            if seen and float(np.median(seen)) >= min_solidity:
                out.append(int(value))
        return out


def make_convex(probabilities: np.ndarray, labels: Sequence[int], convex: Sequence[int], decision: LabelDecision,
                pixel_area_mm2: float) -> np.ndarray:
    """probabilities (L, z, y, x) -> the same, where each ``convex`` label has taken over, slice by
    slice and piece by piece, the voxels inside its convex hull that were decided for another label
    (the two labels' probabilities are swapped there, so the result stays a distribution)."""
    if not convex:
        return probabilities
    out = probabilities.copy()
    decided = decision.decide(probabilities)
    min_pixels = max(1, int(np.ceil(MIN_AREA_MM2 / pixel_area_mm2)))
    channel = {int(v): c for c, v in enumerate(labels)}
    convex_channels = [channel[int(v)] for v in convex]
    for value in convex:
        c = channel[int(value)]
        for z in range(decided.shape[0]):
            for piece, binary in _pieces(decided[z] == c, min_pixels):
                hull = convex_hull_image(binary, offset_coordinates=False)
                window = decided[z][piece]
                # Not background, and not another convex label: where two convex hulls overlap,
                # neither shape says which one is right, so fusion's answer stands.
                taken = hull & (window >= 0) & ~np.isin(window, convex_channels)
                if not taken.any():
                    continue
                rows, cols = np.nonzero(taken)
                rows, cols = rows + piece[0].start, cols + piece[1].start
                winners = decided[z, rows, cols]
                mine = out[c, z, rows, cols].copy()
                out[c, z, rows, cols] = out[winners, z, rows, cols]
                out[winners, z, rows, cols] = mine
                decided[z, rows, cols] = c
    return out
