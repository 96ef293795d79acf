"""Joint fusion's search by mean squares, compiled: one pass per slice and offset instead of ten.

The search (``joint_fusion.search``) scores every offset of every atlas at every centre of the box
with box sums. In torch each offset costs about ten passes over the whole box (difference, square,
mask, a cumulative sum and a difference per axis, division, comparison): on a CHAOS query (15 votes
of 75 offsets over 1.5 million centres) 22-25 s, half of the fusion. Here one compiled loop per
slice and offset does all of it on data that stays in the core's cache.

The arithmetic is the torch path's, operation for operation, so the offsets chosen are the same
bits (``tests/test_joint_fusion.py`` compares them): squared differences, zero where a voxel pair
is missing; box sums as a running sum down the rows and then along each row, each followed by the
difference of the running sums ``2r + 1`` apart, as ``BoxSums`` does; division by the pair count;
and the tolerance ``score - (|score| + scale) * TIE`` that a later offset must beat. Compiled
without fast-math, so nothing is reordered or fused. Only patches one slice thick (the thick-slice
default): a patch across slices sums along them first, which the torch path does.

Slices are independent, so they are split among threads (``nogil``), as many as torch uses.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np


def _compiled(function):
    """Compiled, its machine code cached on disk (numba's cache: next to this file, else the user's cache
    directory) so that a new process does not compile it again (about a second); compiled per process where
    neither can be written (a read-only install)."""
    try:
        return numba.njit(nogil=True, cache=True)(function)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(function)


@_compiled
def _slices(query, atlas, offsets, first, last, start, radius_y, radius_x, landed, pairs, counts,
            n_patch, tie, scale, best, bar, z0, z1):  # pragma: no cover - compiled
    """Offsets first..last-1 of one atlas, for the centres of slices z0..z1-1 of the box (``best``, ``bar``:
    (Z, Y, X)). ``first == 0`` stores offset 0's scores in ``bar`` (the caller makes them the bar); otherwise a
    score below the bar makes its offset the best there and its tolerance-lowered score the new bar."""
    size_y, size_x = bar.shape[1], bar.shape[2]
    extent_y, extent_x = size_y + 2 * radius_y, size_x + 2 * radius_x
    width_y, width_x = 2 * radius_y, 2 * radius_x
    running = np.empty((extent_y, extent_x))
    down = np.empty((size_y, extent_x))
    along = np.empty(extent_x)
    masked = pairs.shape[0] > 1
    for z in range(z0, z1):
        for j in range(first, last):
            dz, dy, dx = offsets[j, 0], offsets[j, 1], offsets[j, 2]
            qz, qy, qx = start[0] + z, start[1], start[2]
            for y in range(extent_y):  # running sums down the rows of the squared differences
                for x in range(extent_x):
                    d = query[qz, qy + y, qx + x] - atlas[qz + dz, qy + y + dy, qx + x + dx]
                    d = d * d
                    if masked and not pairs[j, z, y, x]:
                        d = 0.0
                    running[y, x] = d if y == 0 else running[y - 1, x] + d
            for x in range(extent_x):
                down[0, x] = running[width_y, x]
            for y in range(1, size_y):
                for x in range(extent_x):
                    down[y, x] = running[y + width_y, x] - running[y - 1, x]
            for y in range(size_y):
                total = 0.0
                for x in range(extent_x):  # running sum along the row
                    total = total + down[y, x]
                    along[x] = total
                for x in range(size_x):
                    box = along[width_x] if x == 0 else along[x + width_x] - along[x - 1]
                    n = np.float64(counts[j, z, y, x]) if masked else np.float64(n_patch)
                    score = box / n
                    if not landed[j, z, y, x]:
                        score = np.inf
                    if first == 0:
                        bar[z, y, x] = score
                    elif score < bar[z, y, x]:
                        best[z, y, x] = j
                        bar[z, y, x] = score - (abs(score) + scale) * tie
    return 0


def search_atlas(query: np.ndarray, atlas: np.ndarray, offsets: np.ndarray, start, radius_y: int, radius_x: int,
                 landed: np.ndarray, pairs: np.ndarray | None, counts: np.ndarray | None, n_patch: int, tie: float,
                 best: np.ndarray, threads: int) -> None:
    """One atlas's best offsets into ``best`` (Z, Y, X) int64, in place. query, atlas: the cut arrays (float64);
    start: where the patches of the box's first centre begin in them; landed (S, Z, Y, X): the searched patch
    exists; pairs (S, Z, extent y, extent x) and counts (S, Z, Y, X): the voxel pairs inside the image and their
    number per patch, or None when every voxel is inside."""
    offsets = np.ascontiguousarray(offsets, np.int64)
    start = np.asarray(start, np.int64)
    bar = np.empty(best.shape, np.float64)
    masked = pairs is not None
    if not masked:  # typed stand-ins: the kernel tests their length
        pairs, counts = np.ones((1, 1, 1, 1), bool), np.ones((1, 1, 1, 1), np.int16)
    parts = np.array_split(np.arange(best.shape[0]), max(1, min(int(threads), best.shape[0])))
    spans = [(int(p[0]), int(p[-1]) + 1) for p in parts if len(p)]

    def run(first, last, scale):
        args = (query, atlas, offsets, first, last, start, int(radius_y), int(radius_x), landed, pairs, counts,
                int(n_patch), float(tie), float(scale), best, bar)
        if len(spans) == 1:
            _slices(*args, *spans[0])
            return
        with ThreadPoolExecutor(len(spans)) as pool:
            for done in [pool.submit(_slices, *args, z0, z1) for z0, z1 in spans]:
                done.result()

    run(0, 1, 0.0)
    finite = bar[np.isfinite(bar)]
    scale = float(np.abs(finite).max()) if finite.size else 0.0  # what torch.nan_to_num(posinf=0).abs().max() gives
    bar -= (np.abs(bar) + scale) * tie  # offset 0's scores, lowered by the tolerance: the bar
    run(1, len(offsets), scale)
