"""Joint label fusion on whole arrays: ANTs' algorithm, vectorised.

``antsJointFusion`` (ITK's ``WeightedVotingFusionImageFilter``) visits one voxel at a time. This
module computes the same quantities for all voxels at once, with box sums and batched solves in
torch (device-agnostic; the tests prove it on CPU against antspyx):

1. **Search.** For each atlas, every offset ``s`` of the search window (ordered by physical distance,
   nearest first; ties keep the first) is scored at every centre ``x``: mean squared difference of the
   raw patches (ANTs' MSQ), or, with ``correlation``, the signed squared correlation of the raw atlas
   patch with the normalised query patch (ANTs' PC). One box sum per atlas and offset scores all
   centres. The best offset ``s_i(x)`` is kept per atlas.
2. **Weights.** Patches are normalised (mean removed, divided by their standard deviation floored at 1,
   as ANTs does). ``M_ij = (sum_k |d_ik| |d_jk| / (P - 1)) ** beta`` from the absolute differences to the
   query's patch; ``(M + alpha I) w = 1`` by Cholesky (a pseudo-inverse where it fails); negative
   weights are set to 0 and the rest normalised to sum 1.
3. **Votes.** Like ANTs, a centre votes for every voxel of its patch: voxel ``z`` receives ``w_i(x)`` for
   the label atlas ``i`` has at ``z + s_i(x)``. Summed over centres, that is a box sum per atlas and
   offset of the weights of the centres that chose it. Posteriors are divided by the votes' total where
   it is at least 0.1.

Patch voxels outside the image are missing, as in ANTs: a patch that has any makes its atlas's row of
``M`` zero. What differs from ANTs is only floating-point order (box sums instead of loops), which can
flip a near-tie in the search; ``tests/test_joint_fusion.py`` bounds the difference. Non-negative
least squares (``antsJointFusion -c``) is not implemented here.
"""
from __future__ import annotations

import itertools
import logging
import time
from typing import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

# Search scores within this fraction of their largest magnitude from the best count as ties (the nearest
# offset wins, as in ANTs' strict comparison): exact ties are common in flat regions, where the unshifted
# patch must win, and box sums by cumulative sums round them apart.
TIE = 1e-9
# A patch's standard deviation is floored here: a flat patch is centred, not divided by zero.
FLAT = 1e-12


def search_offsets(radius: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """(S, 3) offsets of the search window, nearest first in millimetres; ties in ITK's neighbourhood order
    (first axis fastest)."""
    ranges = [range(-int(r), int(r) + 1) for r in radius]
    offsets = [tuple(reversed(o)) for o in itertools.product(*reversed(ranges))]  # first axis fastest
    distance = [sum((o[d] * float(spacing[d])) ** 2 for d in range(3)) for o in offsets]
    order = sorted(range(len(offsets)), key=lambda n: distance[n])
    return np.asarray([offsets[n] for n in order], np.int64)


def box_sum(a: torch.Tensor, radius: Sequence[int]) -> torch.Tensor:
    """Sum over the (2r+1)^3 box around each voxel, over the last three axes, for voxels at least ``r`` from
    the edge: the output is smaller by 2r along each axis."""
    for axis, r in zip((-3, -2, -1), radius):
        if r == 0:
            continue
        c = torch.cumsum(a, dim=axis)
        n = a.shape[axis] - 2 * r
        a = c.narrow(axis, 2 * r, n).clone()  # sum up to j + 2r ...
        a.narrow(axis, 1, n - 1).sub_(c.narrow(axis, 0, n - 1))  # ... minus the sum before j
    return a


def fuse_jointly(query: np.ndarray, images: np.ndarray, labels: np.ndarray, region: np.ndarray,
                 spacing: Sequence[float], patch_radius: Sequence[int], search_radius: Sequence[int],
                 beta: float, alpha: float, correlation: bool = False,
                 chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """query (Z, Y, X), images (K, Z, Y, X), labels (K, Z, Y, X) integers, region (Z, Y, X) bool, the voxels
    to fuse. Returns (label values, posteriors (n labels, n region voxels), in ``region``'s C order)."""
    pr = np.asarray(patch_radius, np.int64)
    sr = np.asarray(search_radius, np.int64)
    offsets = search_offsets(sr, spacing)
    k = len(images)
    shape = np.asarray(query.shape)
    values = np.unique(labels[:, region])
    centres = np.argwhere(region)
    lo, hi = centres.min(0), centres.max(0) + 1
    # Everything is cut from arrays padded by this much (missing voxels: NaN intensity, label -1) so that
    # any patch of any searched centre can be read without bounds checks.
    pad = 2 * pr + sr
    box = tuple(slice(int(a), int(b + 2 * p)) for a, b, p in zip(lo, hi, pad))  # the region's box, padded

    def padded(array, fill):
        return np.pad(array, [(0, 0)] * (array.ndim - 3) + [(int(p), int(p)) for p in pad], constant_values=fill)

    if not (np.isfinite(query).all() and np.isfinite(images).all()):
        raise ValueError("joint fusion needs finite intensities in the query and every atlas")
    q = torch.from_numpy(padded(np.asarray(query, np.float64), 0.0)[box])
    a = torch.from_numpy(padded(np.asarray(images, np.float64), 0.0)[(slice(None),) + box])
    lab = torch.from_numpy(padded(np.asarray(labels, np.int64), -1)[(slice(None),) + box])
    inside = torch.from_numpy(padded(np.ones(query.shape, bool), False)[box])  # voxels of the image
    size = np.asarray(q.shape)
    centre_size = hi - lo  # centres' box, at offset `pad` inside the cut arrays
    q_ok = inside.double()
    n_patch = int(np.prod(2 * pr + 1))

    def window(t, start, extent):  # t[..., start:start+extent] over the last three axes
        return t[(...,) + tuple(slice(int(s), int(s + e)) for s, e in zip(start, extent))]

    def statistics(values, ok, start, extent):
        """Patch count, mean and standard deviation (n - 1, floored) of patches centred on window(start, extent)."""
        v, o = window(values, start - pr, extent + 2 * pr), window(ok, start - pr, extent + 2 * pr)
        n = box_sum(o, pr)
        mean = box_sum(v, pr) / n
        var = (box_sum(v * v, pr) - n * mean * mean) / (n - 1)
        return n, mean, torch.clamp(torch.sqrt(torch.clamp(var, min=0)), min=FLAT)

    # Patch statistics of the query at the centres, and of each atlas wherever a search can land
    n_t, mean_t, std_t = statistics(q, q_ok, pad, centre_size)
    reach = centre_size + 2 * sr
    atlas_stats = [statistics(a[i], q_ok, pad - sr, reach) for i in range(k)]

    timer = [time.perf_counter()]

    def lap():
        timer.append(time.perf_counter())
        return round(timer[-1] - timer[-2], 2)

    # 1. Search: the best offset per atlas and centre (indices into `offsets`)
    patch_extent = centre_size + 2 * pr
    tq = window(q, pad - pr, patch_extent)
    landed = torch.stack([window(inside, pad + s, centre_size) for s in offsets])  # the searched voxel is in the image
    complete = bool(inside.all())  # no voxel outside the image in reach: every patch is whole
    ok = n = None
    if not complete:  # the voxel pairs both inside the image, and their number per patch (as ANTs counts them)
        tq_ok = window(q_ok, pad - pr, patch_extent)
        ok = torch.stack([tq_ok * window(q_ok, pad - pr + s, patch_extent) for s in offsets])
        n = box_sum(ok, pr)
        landed &= n >= 3
        n.clamp_(min=1)
    best = torch.empty((k,) + tuple(int(c) for c in centre_size), dtype=torch.int64)
    for i in range(k):
        # Offsets in order, nearest first; one replaces the best so far only when it is better by more than
        # rounding (box sums by cumulative sums round apart scores that ANTs' loops find equal, as in flat
        # regions, where the unshifted patch must win)
        best_score = torch.full(tuple(int(c) for c in centre_size), torch.inf, dtype=torch.float64)
        best_i = best[i].zero_()
        for j, s in enumerate(offsets):
            ta = window(a[i], pad - pr + s, patch_extent)
            pair = None if ok is None else ok[j]
            if correlation:
                ta = ta if pair is None else ta * pair
                sx, sxx = box_sum(ta, pr), box_sum(ta * ta, pr)
                sxt = box_sum(ta * (tq if pair is None else tq * pair), pr)
                sxy = (sxt - mean_t * sx) / std_t
                var_x = torch.clamp(sxx - sx * sx / (n_patch if n is None else n[j]), min=1e-6)
                measure = sxy * sxy / var_x
                score = torch.where(sxy > 0, -measure, measure)
            else:
                diff = (tq - ta).square_()
                score = box_sum(diff if pair is None else diff.mul_(pair), pr)
                score = score.div_(n_patch if n is None else n[j])
            score.masked_fill_(~landed[j], torch.inf)
            if j == 0:
                best_score = score
                scale = float(torch.nan_to_num(score, posinf=0.0).abs().max())
                continue
            better = score < best_score - TIE * (best_score.abs() + scale)
            best_i[better] = j
            best_score = torch.where(better, score, best_score)

    t_search = lap()

    # 2. Weights at the region's centres, in chunks. A patch with a voxel outside the image makes its atlas's
    # row of M zero (ANTs' NaN sums).
    rel = torch.from_numpy(centres - lo)  # centres within the centres' box
    strides = torch.tensor([size[1] * size[2], size[2], 1], dtype=torch.int64)
    patch = torch.from_numpy(np.stack(np.meshgrid(*[np.arange(-p, p + 1) for p in pr], indexing="ij"), -1).reshape(-1, 3))
    patch_flat = patch @ strides
    reach_strides = torch.tensor([reach[1] * reach[2], reach[2], 1], dtype=torch.int64)
    box_strides = torch.tensor([centre_size[1] * centre_size[2], centre_size[2], 1], dtype=torch.int64)
    off = torch.from_numpy(offsets)
    off_cut, off_reach = off @ strides, off @ reach_strides  # an offset's step in the cut arrays, in `reach`
    # Flat indices (torch.take and index_select gather several times faster than indexing by coordinates)
    in_cut = (rel + torch.from_numpy(pad)) @ strides
    in_reach = (rel + torch.from_numpy(sr)) @ reach_strides
    in_box = rel @ box_strides
    q_flat, a_flat = q.reshape(-1).float(), a.reshape(k, -1).float()
    mean_t, std_t, whole_t = (t.reshape(-1).index_select(0, in_box) for t in (mean_t, std_t, n_t >= n_patch))
    chosen = best.reshape(k, -1).index_select(1, in_box)  # (K, R) offsets chosen at the region's centres
    flat_stats = [[t.reshape(-1) for t in st] for st in atlas_stats]
    weights = torch.empty((k, len(centres)), dtype=torch.float64)
    eye = torch.eye(k, dtype=torch.float64)
    for start in range(0, len(centres), chunk):
        part = slice(start, start + chunk)
        base = in_cut[part]
        tp = torch.take(q_flat, base[:, None] + patch_flat[None])
        tp.sub_(mean_t[part, None].float()).div_(std_t[part, None].float())
        d = torch.empty((len(base), k, n_patch), dtype=torch.float32)
        missing = (~whole_t[part])[:, None].repeat(1, k)
        for i in range(k):
            s = chosen[i, part]
            where = in_reach[part] + off_reach[s]
            n_a, mean_a, std_a = (t.index_select(0, where) for t in flat_stats[i])
            ap = torch.take(a_flat[i], (base + off_cut[s])[:, None] + patch_flat[None])
            ap.sub_(mean_a[:, None].float()).div_(std_a[:, None].float()).sub_(tp).abs_()
            d[:, i] = ap
            missing[:, i] |= n_a < n_patch
        m = (torch.bmm(d, d.transpose(1, 2)) / (n_patch - 1)).double()
        m = m * m if beta == 2 else m ** beta
        m = torch.where(missing[:, :, None] | missing[:, None, :] | ~torch.isfinite(m), 0.0, m)
        weights[:, part] = solve(m + alpha * eye).T

    t_weights = lap()

    # 3. Votes: voxel z gets w_i(x) for label_i(z + s_i(x)), for every centre x whose patch holds z
    vote_extent = tuple(int(e) for e in centre_size + 2 * pr)
    # One channel per label value, and a last one that discards votes for anything else (outside the
    # image, or a label the atlases do not have in the region)
    posterior = torch.zeros((len(values) + 1,) + vote_extent, dtype=torch.float32)  # weights sum to 1 per centre
    lookup = torch.full((int(max(labels.max(), 0)) + 2,), len(values), dtype=torch.int64)
    lookup[torch.from_numpy(values.astype(np.int64))] = torch.arange(len(values))
    mass_size = centre_size + 4 * pr
    mass = torch.zeros(int(np.prod(mass_size)), dtype=torch.float32)
    margin = rel + torch.from_numpy(2 * pr)  # centres in `mass`
    in_mass = margin @ torch.tensor([mass_size[1] * mass_size[2], mass_size[2], 1], dtype=torch.int64)
    mass3 = mass.view(tuple(int(e) for e in mass_size))
    for i in range(k):
        channel = lookup[torch.clamp(lab[i], min=-1)]  # label -1 (outside) -> lookup[-1], the discard channel
        for j in torch.unique(chosen[i]).tolist():
            chose = torch.nonzero(chosen[i] == j)[:, 0]
            where = in_mass.index_select(0, chose)
            mass.index_copy_(0, where, weights[i].index_select(0, chose).float())
            # Only the box of these centres' patches receives their votes
            sel = margin.index_select(0, chose)
            first, last = (sel.min(0).values - torch.from_numpy(pr)).numpy(), (sel.max(0).values + 1 + torch.from_numpy(pr)).numpy()
            spread = box_sum(window(mass3, first - pr, last - first + 2 * pr), pr)
            mass.index_fill_(0, where, 0.0)
            voted = window(channel, pad - pr + offsets[j] + first - pr, last - first)
            window(posterior, first - pr, last - first).scatter_add_(0, voted[None], spread[None])
    posterior = posterior.reshape(len(values) + 1, -1)
    posterior = posterior[:-1].reshape((len(values),) + vote_extent)
    total = posterior.sum(0)
    keep = total >= 0.1
    posterior = torch.where(keep, posterior / torch.where(keep, total, 1.0), posterior)
    logger.debug("joint fusion of %d voxels, %d votes: search %s s, weights %s s, votes %s s", len(centres), k,
                 t_search, t_weights, lap())
    at = rel + torch.from_numpy(pr)
    return values, posterior[:, at[:, 0], at[:, 1], at[:, 2]].numpy()


def solve(m: torch.Tensor) -> torch.Tensor:
    """(C, K, K) -> (C, K): w with m w = 1, negatives set to 0, normalised to sum 1. Cholesky, as ANTs; where it
    fails, the least-squares solution by SVD (ANTs' fallback for ill-conditioned matrices)."""
    ones = torch.ones(m.shape[:-1] + (1,), dtype=m.dtype)
    chol, info = torch.linalg.cholesky_ex(m)
    w = torch.cholesky_solve(ones, chol)
    bad = info != 0
    if bool(bad.any()):
        w[bad] = torch.linalg.pinv(m[bad], hermitian=True) @ ones[bad]
    w = torch.clamp(w[..., 0], min=0.0)
    return w / w.sum(-1, keepdim=True)
