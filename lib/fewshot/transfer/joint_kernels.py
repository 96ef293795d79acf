"""Joint label fusion's three loops, compiled: the same bits as torch's passes, in less time.

``joint_fusion`` computes ANTs' joint label fusion on whole arrays in torch. Three of its steps cost
many passes over large arrays, which here become one compiled loop each, on data that stays in the
core's cache (a CHAOS query, 15 votes over 1.5 million centres: docs/results.md, "Joint fusion
compiled"):

- ``search_atlas``: the search by mean squares. In torch each offset costs about ten passes over the
  whole box (difference, square, mask, a cumulative sum and a difference per axis, division,
  comparison); here one loop per slice and offset.
- ``differences``: the weights' normalised patch differences, gathered by index (in torch: a take,
  an index_select and four arithmetic passes per atlas and chunk of centres).
- ``votes``: each atlas's votes, either centre by centre onto its patch or as a box sum of the
  weights of the centres that chose one offset.

Each does torch's arithmetic operation for operation, in torch's order, so the results are the same
bits (``tests/test_joint_fusion.py`` compares them): float64 scores; cumulative sums as running sums
in float64, rounded to the array's type, and differences of them ``2r + 1`` apart (``BoxSums``);
float32 normalisation and votes added in the order torch's index_add and scatter_add add them.
Compiled without fast-math, so nothing is reordered or fused into one rounding. The search and the
votes need patches one slice thick (the thick-slice default), whose slices are independent: they are
split among threads (``nogil``), as many as torch uses; thicker patches stay in torch.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np


def on_slices(kernel, args: tuple, slices: int, threads: int) -> None:
    """``kernel(*args, z0, z1)`` over slices 0..slices-1, split into contiguous spans among up to ``threads``
    threads (the kernels release the GIL). The search's and the votes' slices are independent, so each voxel's
    arithmetic, and its order, stays within one call."""
    parts = np.array_split(np.arange(slices), max(1, min(int(threads), int(slices))))
    spans = [(int(p[0]), int(p[-1]) + 1) for p in parts if len(p)]
    if len(spans) <= 1:
        for z0, z1 in spans:
            kernel(*args, z0, z1)
        return
    with ThreadPoolExecutor(len(spans)) as pool:
        for done in [pool.submit(kernel, *args, z0, z1) for z0, z1 in spans]:
            done.result()


def _compiled(function):
    """Compiled, its machine code cached on disk (numba's cache: next to this file, else the user's cache
    directory) so that a new process does not compile it again (the three: about 5 s, cold); compiled per
    process where neither can be written (a read-only install)."""
    try:
        return numba.njit(nogil=True, cache=True)(function)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(function)


@numba.njit(inline="always")
def _keep(score, j, z, y, x, landed, first, best, bar, scale, tie):  # pragma: no cover - compiled
    """Offset ``j``'s score at centre (z, y, x), either search's: infinite where its patch did not land; with
    ``first == 0`` stored as the bar (the caller lowers it); otherwise, below the bar, the best offset there,
    its tolerance-lowered score the new bar."""
    if not landed[j, z, y, x]:
        score = np.inf
    if first == 0:
        bar[z, y, x] = score
    elif score < bar[z, y, x]:
        best[z, y, x] = j
        bar[z, y, x] = score - (abs(score) + scale) * tie


@_compiled
def _slices(query, atlas, offsets, first, last, start, radius_y, radius_x, landed, masked, pairs, counts,
            n_patch, spans, tie, scale, best, bar, z0, z1):  # pragma: no cover - compiled
    """Offsets first..last-1 of one atlas, for the centres of slices z0..z1-1 of the box (``best``, ``bar``:
    (Z, Y, X)); ``masked``: some voxel pairs are missing (``pairs``) and patches count only the others
    (``counts``). ``first == 0`` stores offset 0's scores in ``bar`` (the caller makes them the bar); otherwise a
    score below the bar makes its offset the best there and its tolerance-lowered score the new bar. Only the
    centres of each row's span are scored (``spans`` (Z, Y, 2): columns lo..hi-1; lo == hi for none): the sums
    along a row still start at its first column, so a scored centre's score is the same bits."""
    size_y, size_x = bar.shape[1], bar.shape[2]
    extent_y, extent_x = size_y + 2 * radius_y, size_x + 2 * radius_x
    width_y, width_x = 2 * radius_y, 2 * radius_x
    running = np.empty((extent_y, extent_x))
    down = np.empty((size_y, extent_x))
    along = np.empty(extent_x)
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
                lo, hi = spans[z, y, 0], spans[z, y, 1]
                if lo >= hi:
                    continue
                total = 0.0
                for x in range(hi + width_x):  # running sum along the row, as far as its span needs
                    total = total + down[y, x]
                    along[x] = total
                for x in range(lo, hi):
                    box = along[width_x] if x == 0 else along[x + width_x] - along[x - 1]
                    n = np.float64(counts[j, z, y, x]) if masked else np.float64(n_patch)
                    _keep(box / n, j, z, y, x, landed, first, best, bar, scale, tie)
    return 0


@_compiled
def _slices_correlation(query, atlas, offsets, first, last, start, radius_y, radius_x, landed, masked, pairs, counts,
                        n_patch, spans, mean_q, std_q, tie, scale, best, bar, z0, z1):  # pragma: no cover - compiled
    """``_slices`` by correlation (ANTs' PC; ``joint_fusion.search`` with ``correlation``): three box sums per
    offset (the atlas patch, its square, its product with the query's), then the signed squared correlation
    ``-+ sxy^2 / var_x`` with ``sxy = (box(a q) - mean_q box(a)) / std_q``, ``var_x = max(box(a a) - box(a)^2 / n,
    1e-6)``: torch's operations in torch's order. Row by row: the running sums down the rows are kept for the
    last 2 r + 2 rows only, which is all a box needs, so the three sums stay in the core's cache."""
    size_y, size_x = bar.shape[1], bar.shape[2]
    extent_x = size_x + 2 * radius_x
    width_y, width_x = 2 * radius_y, 2 * radius_x
    rows = width_y + 2  # ring of running sums: rows y - 1 .. y + 2 r
    run_a = np.empty((rows, extent_x))
    run_aa = np.empty((rows, extent_x))
    run_aq = np.empty((rows, extent_x))
    along_a = np.empty(extent_x)
    along_aa = np.empty(extent_x)
    along_aq = np.empty(extent_x)
    for z in range(z0, z1):
        for j in range(first, last):
            dz, dy, dx = offsets[j, 0], offsets[j, 1], offsets[j, 2]
            qz, qy, qx = start[0] + z, start[1], start[2]
            for e in range(size_y + width_y):  # running sums down the rows, one extent row at a time
                r, previous = e % rows, (e - 1) % rows
                for x in range(extent_x):
                    a = atlas[qz + dz, qy + e + dy, qx + x + dx]
                    q = query[qz, qy + e, qx + x]
                    if masked:  # torch multiplies by the pair mask (1 or 0)
                        keep = 1.0 if pairs[j, z, e, x] else 0.0
                        a = a * keep
                        q = q * keep
                    aa, aq = a * a, a * q
                    if e == 0:
                        run_a[r, x], run_aa[r, x], run_aq[r, x] = a, aa, aq
                    else:
                        run_a[r, x] = run_a[previous, x] + a
                        run_aa[r, x] = run_aa[previous, x] + aa
                        run_aq[r, x] = run_aq[previous, x] + aq
                y = e - width_y  # the centres' row whose box this extent row completes
                if y < 0:
                    continue
                lo, hi = spans[z, y, 0], spans[z, y, 1]
                if lo >= hi:  # no centre of this row is scored (``_slices``' spans)
                    continue
                below = (y - 1) % rows
                t_a, t_aa, t_aq = 0.0, 0.0, 0.0
                for x in range(hi + width_x):  # the box down the rows, then running sums along the row
                    if y == 0:
                        d_a, d_aa, d_aq = run_a[r, x], run_aa[r, x], run_aq[r, x]
                    else:
                        d_a = run_a[r, x] - run_a[below, x]
                        d_aa = run_aa[r, x] - run_aa[below, x]
                        d_aq = run_aq[r, x] - run_aq[below, x]
                    t_a = t_a + d_a
                    t_aa = t_aa + d_aa
                    t_aq = t_aq + d_aq
                    along_a[x], along_aa[x], along_aq[x] = t_a, t_aa, t_aq
                for x in range(lo, hi):
                    if x == 0:
                        sx, sxx, saq = along_a[width_x], along_aa[width_x], along_aq[width_x]
                    else:
                        sx = along_a[x + width_x] - along_a[x - 1]
                        sxx = along_aa[x + width_x] - along_aa[x - 1]
                        saq = along_aq[x + width_x] - along_aq[x - 1]
                    n = np.float64(counts[j, z, y, x]) if masked else np.float64(n_patch)
                    sxy = (saq - mean_q[z, y, x] * sx) / std_q[z, y, x]
                    var_x = sxx - sx * sx / n
                    if var_x < 1e-6:
                        var_x = 1e-6
                    measure = sxy * sxy / var_x
                    _keep(-measure if sxy > 0 else measure, j, z, y, x, landed, first, best, bar, scale, tie)
    return 0


def search_atlas(query: np.ndarray, atlas: np.ndarray, offsets: np.ndarray, start, radius_y: int, radius_x: int,
                 landed: np.ndarray, pairs: np.ndarray | None, counts: np.ndarray | None, n_patch: int, tie: float,
                 best: np.ndarray, threads: int, query_stats: tuple[np.ndarray, np.ndarray] | None = None,
                 region: np.ndarray | None = None) -> None:
    """One atlas's best offsets into ``best`` (Z, Y, X) int64, in place. query, atlas: the cut arrays (float64);
    start: where the patches of the box's first centre begin in them; landed (S, Z, Y, X): the searched patch
    exists; pairs (S, Z, extent y, extent x) and counts (S, Z, Y, X): the voxel pairs inside the image and their
    number per patch, or None when every voxel is inside. ``query_stats``: by mean squares when None, else by
    correlation, with the query's patch means and standard deviations (floored) at the box's centres. ``region``
    (Z, Y, X) bool: only these centres' offsets are wanted; past offset 0 (whose scores over the whole box set the
    tie tolerance) only each row's span of them is scored, and ``best`` elsewhere is left as it is."""
    offsets = np.ascontiguousarray(offsets, np.int64)
    start = np.asarray(start, np.int64)
    bar = np.empty(best.shape, np.float64)
    masked = pairs is not None
    if not masked:  # typed stand-ins, never read
        pairs, counts = np.ones((1, 1, 1, 1), bool), np.ones((1, 1, 1, 1), np.int16)

    every = np.zeros(best.shape[:2] + (2,), np.int64)
    every[..., 1] = best.shape[2]
    wanted = every if region is None else row_spans(region)

    def run(first, last, scale):
        common = (query, atlas, offsets, first, last, start, int(radius_y), int(radius_x), landed, masked, pairs, counts,
                  int(n_patch), every if first == 0 else wanted)
        if query_stats is None:
            on_slices(_slices, common + (float(tie), float(scale), best, bar), best.shape[0], threads)
        else:
            on_slices(_slices_correlation, common + tuple(query_stats) + (float(tie), float(scale), best, bar),
                      best.shape[0], threads)

    run(0, 1, 0.0)
    finite = bar[np.isfinite(bar)]
    scale = float(np.abs(finite).max()) if finite.size else 0.0  # what torch.nan_to_num(posinf=0).abs().max() gives
    bar -= (np.abs(bar) + scale) * tie  # offset 0's scores, lowered by the tolerance: the bar
    run(1, len(offsets), scale)


def row_spans(region: np.ndarray) -> np.ndarray:
    """(Z, Y, 2): per row of a (Z, Y, X) mask, the columns from its first True to its last (lo, hi + 1); 0, 0 for
    a row without one."""
    anywhere = region.any(axis=2)
    lo = np.argmax(region, axis=2)
    hi = region.shape[2] - np.argmax(region[..., ::-1], axis=2)
    return np.stack([np.where(anywhere, lo, 0), np.where(anywhere, hi, 0)], -1).astype(np.int64)


@_compiled
def differences(query, atlases, mean_q, scale_q, usable_q, chosen, in_cut, in_landing, step_cut, step_landing,
                patch_cut, mean_a, scale_a, usable_a, start, stop, d, missing):  # pragma: no cover - compiled
    """Joint fusion's weights, the patch differences of centres start..stop-1 (``joint_fusion.weigh``): into
    ``d`` (n, K, P), ``|(a - mean_a) * scale_a - (q - mean_q) * scale_q|`` over each patch, in float32 as torch
    computes it there, and into ``missing`` (n, K) whether the query's or the atlas's patch is unusable.
    Gathered by flat index from the cut (``query``, ``atlases[i]``) and from the atlases' patch statistics where
    the search landed (``mean_a``, ``scale_a``, ``usable_a``)."""
    n_patch = patch_cut.shape[0]
    normalised = np.empty(n_patch, np.float32)
    for c in range(start, stop):
        row = c - start
        base = in_cut[c]
        for p in range(n_patch):
            normalised[p] = (query[base + patch_cut[p]] - mean_q[c]) * scale_q[c]
        for i in range(atlases.shape[0]):
            s = chosen[i, c]
            landed = in_landing[c] + step_landing[s]
            mean, scale = mean_a[i, landed], scale_a[i, landed]
            at = base + step_cut[s]
            for p in range(n_patch):
                d[row, i, p] = abs((atlases[i, at + patch_cut[p]] - mean) * scale - normalised[p])
            missing[row, i] = not usable_q[c] or not usable_a[i, landed]
    return 0


@_compiled
def votes(channel, weight, centres, order, starts, direct, first, last, offsets, start, radius_y, radius_x,
          posterior, z0, z1):  # pragma: no cover - compiled
    """One atlas's votes (``joint_fusion.vote``) onto the slices z0..z1-1 of ``posterior`` (values + 1, Z, extent
    y, extent x), patches one slice thick. Offset by offset (``starts``: its centres in ``order``, ascending),
    either each centre adds its ``weight`` to its patch, centre by centre and patch voxel by patch voxel
    (``direct``), or the weights' box sum over the box ``first``..``last`` (margin coordinates: centre + 2r) is
    added there, slice by slice: running sums in float64 rounded to float32 and float32 differences, as torch's
    cumsum and sub compute them. Either way each voxel receives its additions in torch's order, so the sums are
    the same bits. ``channel``: the atlas's label channel per cut voxel; ``start``: the cut voxel under the
    posterior's first voxel at offset zero."""
    width_y, width_x = 2 * radius_y, 2 * radius_x
    for j in range(offsets.shape[0]):
        if starts[j + 1] == starts[j]:
            continue
        dz, dy, dx = offsets[j, 0] + start[0], offsets[j, 1] + start[1], offsets[j, 2] + start[2]
        if direct[j]:
            for n in range(starts[j], starts[j + 1]):
                c = order[n]
                z = centres[c, 0]
                if z < z0 or z >= z1:
                    continue
                w = weight[c]
                for py in range(width_y + 1):
                    y = centres[c, 1] + py
                    for px in range(width_x + 1):
                        x = centres[c, 2] + px
                        posterior[channel[z + dz, y + dy, x + dx], z, y, x] += w
            continue
        fy, fx = first[j, 1], first[j, 2]  # the box's first voxel, margin coordinates
        rows, cols = last[j, 1] - fy, last[j, 2] - fx
        mass = np.zeros((rows + width_y, cols + width_x), np.float32)
        down = np.empty((rows, cols + width_x), np.float32)
        spread = np.empty((rows, cols), np.float32)
        n = starts[j]
        while n < starts[j + 1]:  # the centres of one slice at a time (ascending: slice by slice)
            z = centres[order[n], 0]
            end = n
            while end < starts[j + 1] and centres[order[end], 0] == z:
                end += 1
            if z < z0 or z >= z1:
                n = end
                continue
            for m in range(n, end):
                c = order[m]
                mass[centres[c, 1] + width_y - (fy - radius_y), centres[c, 2] + width_x - (fx - radius_x)] = weight[c]
            for x in range(cols + width_x):  # box sum down the rows
                total = 0.0
                for y in range(width_y + 1):
                    total += mass[y, x]
                down[0, x] = np.float32(total)
                before = 0.0
                for y in range(1, rows):
                    before += mass[y - 1, x]
                    total += mass[y + width_y, x]
                    down[y, x] = np.float32(total) - np.float32(before)
            for y in range(rows):  # and along the rows
                total = 0.0
                for x in range(width_x + 1):
                    total += down[y, x]
                spread[y, 0] = np.float32(total)
                before = 0.0
                for x in range(1, cols):
                    before += down[y, x - 1]
                    total += down[y, x + width_x]
                    spread[y, x] = np.float32(total) - np.float32(before)
            for y in range(rows):
                ey = fy - radius_y + y
                for x in range(cols):
                    ex = fx - radius_x + x
                    posterior[channel[z + dz, ey + dy, ex + dx], z, ey, ex] += spread[y, x]
            for m in range(n, end):
                c = order[m]
                mass[centres[c, 1] + width_y - (fy - radius_y), centres[c, 2] + width_x - (fx - radius_x)] = 0.0
            n = end
    return 0
