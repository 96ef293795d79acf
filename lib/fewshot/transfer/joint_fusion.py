"""Joint label fusion on whole arrays: ANTs' algorithm, vectorised.

``antsJointFusion`` (ITK's ``WeightedVotingFusionImageFilter``) visits one voxel at a time. This
module computes the same quantities for all voxels at once, with box sums and batched solves in
torch on the CPU (the tests compare it with antspyx's ANTs):

1. **Search.** For each atlas, every offset ``s`` of the search window (ordered by physical distance,
   nearest first; ties keep the first) is scored at every centre ``x``: mean squared difference of the
   raw patches (ANTs' MSQ), or, with ``correlation``, the signed squared correlation of the raw atlas
   patch with the normalised query patch (ANTs' PC). One box sum per atlas and offset scores all
   centres. The best offset ``s_i(x)`` is kept per atlas. With patches one slice thick (the default)
   the same arithmetic runs compiled (``joint_kernels``), slice by slice, by either measure: 3.6x
   faster by mean squares, the same offsets to the bit.
2. **Weights.** Patches are normalised (mean removed, divided by their standard deviation, as ANTs has
   done since 2022, ITKAdaptiveDenoising 4b6b444; before, it floored the deviation at 1).
   ``M_ij = (sum_k |d_ik| |d_jk| / (P - 1)) ** beta`` from the absolute differences to the query's patch; ``(M + alpha I) w = 1`` by Cholesky (a pseudo-inverse where it fails); negative
   weights are set to 0 and the rest normalised to sum 1. The patches are gathered compiled
   (``joint_kernels.differences``), the same float32 bits.
3. **Votes.** Like ANTs, a centre votes for every voxel of its patch: voxel ``z`` receives ``w_i(x)`` for
   the label atlas ``i`` has at ``z + s_i(x)``. Summed over centres, that is a box sum per atlas and
   offset of the weights of the centres that chose it; an offset that few centres chose is cheaper
   scattered centre by centre onto their patches (``DIRECT``). Posteriors are divided by the votes' total
   where it is at least 0.1. With patches one slice thick both ways run compiled
   (``joint_kernels.votes``), each voxel's additions in torch's order: the same bits.

Patch voxels outside the image are missing, as in ANTs: a patch that has any makes its atlas's row of
``M`` zero. Where this differs from ANTs:

- Floating-point order (box sums instead of loops) can flip a near-tie in the search;
  ``tests/test_joint_fusion.py`` bounds the difference.
- A flat patch (no contrast: standard deviation within ``FLAT`` of the query's largest intensity). ANTs
  divides it by its deviation: exactly flat, it turns NaN; nearly flat (zero fill with rounding left in
  it, where a registered atlas has no data), into amplified rounding. Here a flat query patch gives equal
  weights and keeps its unshifted patch, which is what ANTs' NaN does, and a flat atlas patch is centred
  (all zeros), so it differs from any query patch with contrast. ANTs' NaN would instead zero that
  atlas's row of ``M`` and hand the empty atlas the largest weight (``flat_atlas_patches="ants"`` does
  that for every flat chosen patch, for the comparison; ANTs amplifies a nearly flat one instead). The
  search by correlation lands on flat patches more often than by mean squares (a flat patch scores 0,
  which beats every anticorrelated one): with ANTs' rule the labels of
  real registered cardiac atlases are antsJointFusion's at every fused voxel by either measure; with
  this rule they differ at 0.44 % by correlation and none by mean squares (docs/results.md).

Non-negative least squares (``antsJointFusion -c``) is not implemented here.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fewshot.transfer.joint_kernels import differences, on_slices, search_atlas, votes

logger = logging.getLogger(__name__)

# Search scores within this fraction of their largest magnitude from the best count as ties (the nearest
# offset wins, as in ANTs' strict comparison): exact ties are common in flat regions, where the unshifted
# patch must win, and box sums by cumulative sums round them apart.
TIE = 1e-9
# A patch whose standard deviation is at most this fraction of the query's largest intensity is flat: it
# has no contrast to compare (box sums leave rounding where ANTs' loops find exactly 0).
FLAT = 1e-6
# The votes of the centres that chose one offset go directly onto their patches, rather than by a box sum over
# the box that holds them, when this many times their patch voxels is fewer than that box's voxels: a scattered
# voxel costs about this many voxels of a box sum's passes (docs/results.md, "A wider search, made the default")
DIRECT = 4.0


def search_offsets(radius: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """(S, 3) offsets of the search window, nearest first in millimetres; ties in ITK's neighbourhood order
    (first axis fastest). ANTs sorts with std::sort, whose order among equal distances is unspecified: the
    two can differ only where equidistant offsets score exactly the same."""
    ranges = [range(-int(r), int(r) + 1) for r in radius]
    offsets = [tuple(reversed(o)) for o in itertools.product(*reversed(ranges))]  # first axis fastest
    distance = [sum((o[d] * float(spacing[d])) ** 2 for d in range(3)) for o in offsets]
    order = sorted(range(len(offsets)), key=lambda n: distance[n])
    return np.asarray([offsets[n] for n in order], np.int64)


def strides(extent) -> torch.Tensor:
    """Flat-index steps of a C-ordered (z, y, x) array of this extent."""
    return torch.tensor([int(extent[1]) * int(extent[2]), int(extent[2]), 1], dtype=torch.int64)


def box_sum(a: torch.Tensor, radius: Sequence[int]) -> torch.Tensor:
    """Sum over the (2r+1)^3 box around each voxel, over the last three axes, for voxels at least ``r`` from
    the edge: the output is smaller by 2r along each axis."""
    return BoxSums(a.shape, radius, a.dtype)(a)


class BoxSums:
    """``box_sum`` of many arrays, each at most the size given, into buffers allocated once and reused: the search
    and the votes sum one array per atlas and offset, and a fresh tensor of that size costs more in page faults
    than a pass over it (measured on 13 MB: a subtraction into a new tensor 2.97 ms, into an existing one 1.12
    ms). The array returned is overwritten by the next call."""

    def __init__(self, largest, radius: Sequence[int], dtype=torch.float64):
        n = int(np.prod([int(e) for e in largest]))
        self.radius = [int(r) for r in radius]
        self.running = torch.empty(n, dtype=dtype)
        self.out = (torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype))  # alternate: one step's input, the next's output

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        if a.numel() > self.running.numel():
            raise ValueError(f"BoxSums holds {self.running.numel()} voxels, not {a.numel()}")
        if a.dtype != self.running.dtype:  # cumsum would cast it into the buffer: not box_sum's bits
            raise TypeError(f"BoxSums sums {self.running.dtype}, not {a.dtype}")
        shape, steps = list(a.shape), 0
        for axis, r in zip((-3, -2, -1), self.radius):
            if r == 0:
                continue
            running = self.running[:a.numel()].view(a.shape)
            torch.cumsum(a, dim=axis, out=running)  # sum up to j + 2r, minus the sum before j
            shape[axis] -= 2 * r
            out = self.out[steps % 2][:int(np.prod(shape))].view(shape)
            steps += 1
            n = shape[axis]
            out.narrow(axis, 0, 1).copy_(running.narrow(axis, 2 * r, 1))
            torch.sub(running.narrow(axis, 2 * r + 1, n - 1), running.narrow(axis, 0, n - 1), out=out.narrow(axis, 1, n - 1))
            a = out
        return a


def fuse_jointly(query: np.ndarray, images: np.ndarray, labels: np.ndarray, region: np.ndarray,
                 spacing: Sequence[float], patch_radius: Sequence[int], search_radius: Sequence[int],
                 beta: float, alpha: float, correlation: bool = False, flat_atlas_patches: str = "centred",
                 chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """query (Z, Y, X), images (K, Z, Y, X), labels (K, Z, Y, X) integers, region (Z, Y, X) bool, the voxels
    to fuse. Returns (label values, posteriors (n labels, n region voxels), in ``region``'s C order).

    ``flat_atlas_patches``: "centred" (this module's rule for an atlas patch with no contrast) or "ants"
    (antsJointFusion's: its atlas's row of M zero); see the module's docstring.

    ``chunk`` centres have their weights solved together: 1024 keeps their patch differences (chunk x K x patch
    voxels) nearer the cache than 4096 did (a CHAOS query's weights, 15 votes of 169-voxel patches: 6.1 s
    against 6.7-7.1 s, the same bits)."""
    if not (np.isfinite(query).all() and np.isfinite(images).all()):
        raise ValueError("joint fusion needs finite intensities in the query and every atlas")
    if not region.any():
        return np.zeros(0, np.int64), np.zeros((0, 0))
    cut = Cut.around(query, images, labels, region, patch_radius, search_radius, spacing)
    values = label_values(labels[:, region])
    clock = time.perf_counter()
    query_stats = cut.statistics(cut.query, cut.pad, cut.size)
    best = search(cut, query_stats, correlation)
    searched = time.perf_counter()
    chosen, weights = weigh(cut, query_stats, best, beta, alpha, chunk, flat_atlas_patches)
    weighed = time.perf_counter()
    posteriors = vote(cut, values, chosen, weights)
    logger.debug("joint fusion of %d voxels, %d votes: search %.2f s, weights %.2f s, votes %.2f s", len(cut.centres),
                 cut.k, searched - clock, weighed - searched, time.perf_counter() - weighed)
    return values, posteriors


def _label_type(labels: np.ndarray) -> type:
    """The cut's label numbers: int16 when they fit (-1 marks outside the image), a quarter of int64's fresh memory."""
    if labels.size == 0 or (int(labels.min()) >= -1 and int(labels.max()) < np.iinfo(np.int16).max):
        return np.int16
    return np.int64


def label_values(votes: np.ndarray) -> np.ndarray:
    """``np.unique(votes)`` in int64 for integer label numbers that int64 holds (the hard labels come as small unsigned
    integers), by counting rather than sorting: a CHAOS query's 15 votes over half a million voxels took 2.2 s to sort."""
    low, high = int(votes.min()), int(votes.max())
    if high - low > 1 << 20:  # not a label map's numbers: sort them after all
        return np.unique(votes).astype(np.int64)
    # Unsigned votes less their minimum stay in their type; signed ones could wrap there (int16's -1 and 32767)
    shifted = votes - low if votes.dtype.kind == "u" else votes.astype(np.int64, copy=False) - low
    return np.flatnonzero(np.bincount(shifted.ravel(), minlength=high - low + 1)).astype(np.int64) + low


@dataclass
class Cut:
    """The inputs cut around the region's box, enough around it that any patch of any searched centre can be
    read without bounds checks (intensity 0 and label -1 where that lies outside the image)."""
    query: torch.Tensor  # (z, y, x) float64
    images: torch.Tensor  # (K, z, y, x) float64
    labels: torch.Tensor  # (K, z, y, x) int16 (int64 for numbers int16 does not hold, or below -1): only the votes read them
    inside: torch.Tensor  # (z, y, x) bool: voxels of the image
    pad: np.ndarray  # where the centres' box starts in the cut arrays
    size: np.ndarray  # the centres' box
    centres: torch.Tensor  # (R, 3) the region's voxels, in the centres' box
    patch: np.ndarray  # patch radius (slice, row, column)
    reach: np.ndarray  # search radius
    offsets: np.ndarray  # (S, 3) search offsets, nearest first
    flat: float  # a patch's standard deviation up to this is no contrast (FLAT x the query's largest intensity)

    @classmethod
    def around(cls, query, images, labels, region, patch_radius, search_radius, spacing) -> "Cut":
        patch, reach = np.asarray(patch_radius, np.int64), np.asarray(search_radius, np.int64)
        centres = np.argwhere(region)
        lo, hi = centres.min(0), centres.max(0) + 1
        pad = patch + reach  # the farthest any read goes from a centre: a patch at a searched voxel
        start, stop = lo - pad, hi + pad  # in the image's coordinates; may fall outside it
        inner = (...,) + tuple(slice(int(max(a, 0)), int(min(b, n))) for a, b, n in zip(start, stop, region.shape))
        widths = [(int(max(-a, 0)), int(max(b - n, 0))) for a, b, n in zip(start, stop, region.shape)]

        def cut(array, dtype, fill):  # the crop cast straight into its padded place: one fresh array, not two
            part = array[inner]
            shape = part.shape[:-3] + tuple(n + a + b for n, (a, b) in zip(part.shape[-3:], widths))
            out = np.empty(shape, dtype)
            out[(...,) + tuple(slice(a, a + n) for n, (a, _) in zip(part.shape[-3:], widths))] = part
            for axis, (a, b) in enumerate(widths):  # then only what lies outside the image
                for edge in ([slice(0, a)] if a else []) + ([slice(shape[axis - 3] - b, None)] if b else []):
                    out[(...,) + (edge,) + (slice(None),) * (2 - axis)] = fill
            return torch.from_numpy(out)

        return cls(query=cut(query, np.float64, 0.0), images=cut(images, np.float64, 0.0),
                   labels=cut(labels, _label_type(labels), -1), inside=cut(np.ones(region.shape, bool), bool, False),
                   pad=pad, size=hi - lo, centres=torch.from_numpy(centres - lo), patch=patch, reach=reach,
                   offsets=search_offsets(reach, spacing), flat=FLAT * max(float(np.abs(query).max()), 1e-30))

    @property
    def k(self) -> int:
        return len(self.images)

    @property
    def region(self) -> torch.Tensor:
        """(z, y, x) bool over the centres' box: the region's voxels, the centres fused."""
        mask = torch.zeros(tuple(int(c) for c in self.size), dtype=torch.bool)
        mask[self.centres[:, 0], self.centres[:, 1], self.centres[:, 2]] = True
        return mask

    @property
    def patch_size(self) -> int:
        return int(np.prod(2 * self.patch + 1))

    @property
    def patch_voxels(self) -> torch.Tensor:
        """(patch_size, 3) offsets of a patch's voxels from its centre, C order."""
        axes = np.meshgrid(*[np.arange(-p, p + 1) for p in self.patch], indexing="ij")
        return torch.from_numpy(np.stack(axes, -1).reshape(-1, 3))

    def count(self, start, extent, dtype=torch.float64) -> torch.Tensor:
        """In-image voxels of the patches centred on the window (start, extent) of the cut arrays."""
        return box_sum(window(self.inside.to(dtype), start - self.patch, extent + 2 * self.patch), self.patch)

    def statistics(self, values: torch.Tensor, start, extent, n: torch.Tensor | None = None):
        """Count of in-image voxels (``n``, when already counted for this window), mean and standard deviation
        (n - 1; 0 for a flat patch) of the patches centred on the window (start, extent) of the cut arrays."""
        v = window(values, start - self.patch, extent + 2 * self.patch)
        n = self.count(start, extent, values.dtype) if n is None else n
        mean = box_sum(v, self.patch) / n
        var = (box_sum(v * v, self.patch) - n * mean * mean) / (n - 1)
        return n, mean, torch.sqrt(torch.clamp(var, min=0))


def window(t: torch.Tensor, start, extent) -> torch.Tensor:
    """t[..., start:start + extent] over the last three axes."""
    return t[(...,) + tuple(slice(int(s), int(s + e)) for s, e in zip(start, extent))]


def search(cut: Cut, query_stats, correlation: bool, compiled: bool | None = None) -> torch.Tensor:
    """The best offset (index into ``cut.offsets``) per atlas and centre of the centres' box: (K, z, y, x), 0 at
    the box's centres outside the region (the compiled search scores only the region's rows' spans; the tie
    tolerance still comes from offset 0's scores over the whole box, so the region's offsets do not change).
    With patches one slice thick it runs compiled (``joint_kernels.search_atlas``), by either measure, to the
    same offsets; ``compiled`` False keeps it in torch (the tests compare the two)."""
    pr, n_patch = cut.patch, cut.patch_size
    extent = cut.size + 2 * pr  # the patches of the centres' box
    tq = window(cut.query, cut.pad - pr, extent)
    _, mean_t, std_t = query_stats
    flat_t = std_t <= cut.flat  # ANTs' NaN patch: by correlation no offset scores, the unshifted one stays
    std_t = torch.clamp(std_t, min=cut.flat)
    landed = torch.stack([window(cut.inside, cut.pad + s, cut.size) for s in cut.offsets])  # searched voxel in the image
    pairs = n = None
    if not bool(cut.inside.all()):  # voxel pairs both inside the image, and their number per patch, as ANTs counts
        pairs = torch.stack([window(cut.inside, cut.pad - pr, extent) & window(cut.inside, cut.pad - pr + s, extent)
                             for s in cut.offsets])  # bool, and the counts in int16 (exact): memory
        counts = torch.int16 if n_patch < 2 ** 15 else torch.int32
        n = torch.stack([box_sum(pair.float(), pr).to(counts) for pair in pairs])
        landed &= n >= 3
        n.clamp_(min=1)
    if correlation:
        landed[1:] &= ~flat_t
    if pr[0] == 0 and compiled is not False:  # the same arithmetic compiled, one pass per slice and offset
        best = np.zeros((cut.k,) + tuple(int(c) for c in cut.size), np.int64)
        pairs_np = None if pairs is None else pairs.numpy()
        counts_np = None if n is None else n.numpy()
        stats = (mean_t.numpy(), std_t.numpy()) if correlation else None
        region = cut.region.numpy()
        for i in range(cut.k):
            search_atlas(cut.query.numpy(), cut.images[i].numpy(), cut.offsets, cut.pad - pr, int(pr[1]), int(pr[2]),
                         landed.numpy(), pairs_np, counts_np, n_patch, TIE, best[i], torch.get_num_threads(), stats,
                         region)
        best[:, ~region] = 0
        return torch.from_numpy(best)
    # Where a searched patch is missing, per offset, as flat indices: few voxels (near the image's edges), so
    # filling them costs less than a pass over the box
    missed = [m.logical_not_().view(-1).nonzero().view(-1) for m in landed]
    size = tuple(int(c) for c in cut.size)
    best = torch.zeros((cut.k,) + size, dtype=torch.int64)
    # Buffers reused for every atlas and offset (see BoxSums)
    if not correlation:
        boxes = BoxSums(tuple(int(e) for e in extent), pr)
        diff = torch.empty(tuple(int(e) for e in extent), dtype=torch.float64)
    bar, better = torch.empty(size, dtype=torch.float64), torch.empty(size, dtype=torch.bool)

    def less_tolerance(score):  # score - TIE * (|score| + scale), in place
        return score.sub_(torch.abs(score).add_(scale).mul_(TIE))

    for i in range(cut.k):
        # Offsets in order, nearest first; one replaces the best so far only when it is better by more than
        # rounding (box sums by cumulative sums round apart scores that ANTs' loops find equal, as in flat
        # regions, where the unshifted patch must win). ``bar`` is what a later score must beat: the best
        # score so far less that tolerance. Past the first offsets few centres improve: only theirs are
        # updated, by index, rather than every centre by a pass over the box.
        flat_best, flat_bar = best[i].view(-1), bar.view(-1)
        for j, s in enumerate(cut.offsets):
            ta = window(cut.images[i], cut.pad - pr + s, extent)
            pair = None if pairs is None else pairs[j]  # bool and int16 counts: exact in float64 arithmetic
            if correlation:
                ta = ta if pair is None else ta * pair
                sx, sxx = box_sum(ta, pr), box_sum(ta * ta, pr)
                sxy = (box_sum(ta * (tq if pair is None else tq * pair), pr) - mean_t * sx) / std_t
                var_x = torch.clamp(sxx - sx * sx / (n_patch if n is None else n[j].double()), min=1e-6)
                measure = sxy * sxy / var_x
                score = torch.where(sxy > 0, -measure, measure)
            else:
                torch.sub(tq, ta, out=diff).square_()
                score = boxes(diff if pair is None else diff.mul_(pair)).div_(n_patch if n is None else n[j])
            score.view(-1).index_fill_(0, missed[j], torch.inf)
            if j == 0:
                scale = float(torch.nan_to_num(score, posinf=0.0).abs().max())
                bar.copy_(less_tolerance(score))
                continue
            improved = torch.lt(score, bar, out=better).view(-1).nonzero().view(-1)
            flat_best.index_fill_(0, improved, j)
            flat_bar.index_copy_(0, improved, less_tolerance(score.view(-1).index_select(0, improved)))
    best[:, ~cut.region] = 0
    return best


def weigh(cut: Cut, query_stats, best: torch.Tensor, beta: float, alpha: float,
          chunk: int, flat_atlas_patches: str = "centred") -> tuple[torch.Tensor, torch.Tensor]:
    """Each atlas's weight at each centre of the region, from its chosen patch: (chosen offsets, weights), both
    (K, R). A patch with a voxel outside the image makes its atlas's row of M zero (ANTs' NaN sums); a flat
    query patch makes every row zero (equal weights, as ANTs' NaN patch does); a flat atlas patch is centred
    (all zeros), where ANTs' NaN makes its row zero and so gives it the largest weight: ``flat_atlas_patches``
    "ants" does that instead."""
    if flat_atlas_patches not in ("centred", "ants"):
        raise ValueError(f"flat_atlas_patches {flat_atlas_patches!r} must be centred or ants")
    sr, k, n_patch = cut.reach, cut.k, cut.patch_size

    def scale(std):  # 1 / standard deviation; 0 for a flat patch, which so comes out centred, all zeros
        return torch.where(std > cut.flat, 1.0 / torch.clamp(std, min=cut.flat), 0.0).float()

    n_t, mean_t, std_t = query_stats
    landing = cut.size + 2 * sr  # where a search can land: the atlases' patch statistics there
    n_landing = cut.count(cut.pad - sr, landing)  # the same for every atlas: where the image is
    atlas_stats = []
    for i in range(k):
        _, mean_a, std_a = cut.statistics(cut.images[i], cut.pad - sr, landing, n_landing)
        atlas_stats.append((mean_a.reshape(-1).float(), scale(std_a).reshape(-1)))
    whole_landing = (n_landing >= n_patch).reshape(-1)
    # Flat indices: torch.take and index_select gather several times faster than indexing by coordinates
    in_cut = (cut.centres + torch.from_numpy(cut.pad)) @ strides(cut.query.shape)
    in_landing = (cut.centres + torch.from_numpy(sr)) @ strides(landing)
    in_box = cut.centres @ strides(cut.size)
    offsets = torch.from_numpy(cut.offsets)
    step_cut, step_landing = offsets @ strides(cut.query.shape), offsets @ strides(landing)
    patch_cut = cut.patch_voxels @ strides(cut.query.shape)
    q_flat, a_flat = cut.query.reshape(-1).float(), cut.images.reshape(k, -1).float()
    usable_t = (n_t >= n_patch) & (std_t > cut.flat)  # whole, and with contrast
    mean_t, scale_t, usable_t = (t.reshape(-1).index_select(0, in_box) for t in (mean_t.float(), scale(std_t), usable_t))
    chosen = best.reshape(k, -1).index_select(1, in_box)
    weights = torch.empty((k, len(cut.centres)), dtype=torch.float64)
    eye = torch.eye(k, dtype=torch.float64)
    # The patches are gathered and normalised compiled (joint_kernels.differences: torch's float32 arithmetic, the
    # same bits; tests/test_joint_fusion.py), a chunk of centres at a time; M and its solve stay in torch
    means_a = torch.stack([mean for mean, _ in atlas_stats]).numpy()
    scales_a = torch.stack([scale_a for _, scale_a in atlas_stats]).numpy()
    # An atlas's patch where the search lands is usable when whole (else ANTs' sums are NaN) and, by ANTs' rule,
    # not flat (ANTs' normalisation is NaN then): an unusable one makes its atlas's row of M zero
    usable_a = whole_landing.expand(k, -1)
    if flat_atlas_patches == "ants":
        usable_a = usable_a & torch.from_numpy(scales_a != 0)
    arrays = [t.numpy() for t in (q_flat, a_flat, mean_t, scale_t, usable_t, chosen, in_cut, in_landing, step_cut,
                                  step_landing, patch_cut)] + [means_a, scales_a, usable_a.contiguous().numpy()]
    d_buffer = torch.empty((min(chunk, len(cut.centres)), k, n_patch), dtype=torch.float32)
    missing_buffer = torch.empty((min(chunk, len(cut.centres)), k), dtype=torch.bool)
    for start in range(0, len(cut.centres), chunk):
        part = slice(start, start + chunk)
        n = len(cut.centres[part])
        d, missing = d_buffer[:n], missing_buffer[:n]  # |normalised atlas patch - query's|; a patch unusable
        differences(*arrays, start, start + n, d.numpy(), missing.numpy())
        m = (torch.bmm(d, d.transpose(1, 2)) / (n_patch - 1)).double()
        m = m * m if beta == 2 else m ** beta
        m = torch.where(missing[:, :, None] | missing[:, None, :] | ~torch.isfinite(m), 0.0, m)
        weights[:, part] = solve(m + alpha * eye).T
    return chosen, weights


def vote(cut: Cut, values: np.ndarray, chosen: torch.Tensor, weights: torch.Tensor,
         direct: float | None = None, compiled: bool | None = None) -> np.ndarray:
    """Voxel z gets w_i(x) for the label atlas i has at z + s_i(x), from every centre x whose patch holds z.
    Returns the posteriors (n values, R) at the region's centres.

    The centres of one atlas that chose one offset vote in one of two ways, whichever costs less: a box sum of
    their weights over the box that holds them (a few passes over that box), or, when they are few, each
    centre scattering its weight onto its own patch (``direct`` x their patch voxels against the box's
    voxels). The nearest offsets are chosen by most centres; a wider search adds many offsets that few choose,
    each of which would otherwise cost a box sum over nearly the whole region. With patches one slice thick both
    ways run compiled, slice by slice in torch's thread count (``joint_kernels.votes``), to the same bits."""
    direct = DIRECT if direct is None else direct
    pr, n_patch = cut.patch, cut.patch_size
    extent = tuple(int(e) for e in cut.size + 2 * pr)  # every voxel a centre's patch holds
    # One channel per label value, and a last one that discards votes for anything else (outside the
    # image, or a label the atlases do not have in the region). float32: weights sum to 1 per centre.
    posterior = torch.zeros((len(values) + 1,) + extent, dtype=torch.float32)
    flat_posterior, n_extent = posterior.view(-1), int(np.prod(extent))
    lookup = torch.full((int(max(int(cut.labels.max()), 0)) + 2,), len(values), dtype=torch.int64)
    lookup[torch.from_numpy(values.astype(np.int64))] = torch.arange(len(values))
    margin = cut.centres + torch.from_numpy(2 * pr)  # centres in the mass's coordinates (room for a patch's box sum)
    # Patches one slice thick: the same sums compiled (joint_kernels.votes), the same bits; ``compiled`` False
    # keeps them in torch (the tests compare the two)
    compiled = bool(pr[0] == 0) if compiled is None else bool(compiled and pr[0] == 0)
    if not compiled:  # the torch votes' buffers and flat indices
        mass_size = cut.size + 4 * pr  # the centres' weights, with room for a patch's box sum around each
        mass = torch.zeros(int(np.prod(mass_size)), dtype=torch.float32)
        mass3 = mass.view(tuple(int(e) for e in mass_size))
        in_mass = margin @ strides(mass_size)
        # For the direct votes: a centre's patch in the posterior's and in the cut's flat indices
        patch = cut.patch_voxels
        in_extent = (cut.centres + torch.from_numpy(pr)) @ strides(extent)
        in_cut = (cut.centres + torch.from_numpy(cut.pad)) @ strides(cut.query.shape)
        patch_extent, patch_cut = patch @ strides(extent), patch @ strides(cut.query.shape)
        step_cut = torch.from_numpy(cut.offsets) @ strides(cut.query.shape)
        per_chunk = max(1, (1 << 20) // n_patch)
        boxes = BoxSums(mass_size, pr, torch.float32)
    for i in range(cut.k):
        channel = lookup[torch.clamp(cut.labels[i], min=-1).long()]  # label -1 (outside) -> lookup[-1], the discard channel
        flat_channel, w = channel.reshape(-1), weights[i].float()
        order = torch.argsort(chosen[i], stable=True)
        counts = torch.bincount(chosen[i], minlength=len(cut.offsets)).tolist()
        starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        # Per offset, the box its centres' patches cover (only that box receives their votes), for all offsets at
        # once: the centres sorted by offset, each offset's run reduced (its first index in ``starts``).
        used = np.flatnonzero(counts)
        boxes_of = np.zeros((len(counts), 2, 3), np.int64)
        if len(used):
            by_offset = margin.index_select(0, order).numpy()
            boxes_of[used, 0] = np.minimum.reduceat(by_offset, np.asarray(starts)[used], axis=0) - pr
            boxes_of[used, 1] = np.maximum.reduceat(by_offset, np.asarray(starts)[used], axis=0) + 1 + pr
        # per offset: its centres vote one by one
        scattered = direct * np.asarray(counts) * n_patch < np.prod(boxes_of[:, 1] - boxes_of[:, 0], axis=1).astype(np.float64)
        for j in used if not compiled else ():
            chose = order[starts[j]:starts[j + 1]]
            first, last = boxes_of[j]
            if scattered[j]:
                for part in torch.split(chose, per_chunk):  # each centre onto its own patch
                    target = in_extent.index_select(0, part)[:, None] + patch_extent[None]
                    voted = flat_channel.take(in_cut.index_select(0, part)[:, None] + (patch_cut + step_cut[j])[None])
                    flat_posterior.index_add_(0, (voted * n_extent + target).reshape(-1),
                                              w.index_select(0, part)[:, None].expand(-1, n_patch).reshape(-1))
                continue
            where = in_mass.index_select(0, chose)
            mass.index_copy_(0, where, w.index_select(0, chose))
            spread = boxes(window(mass3, first - pr, last - first + 2 * pr))
            mass.index_fill_(0, where, 0.0)
            voted = window(channel, cut.pad - pr + cut.offsets[j] + first - pr, last - first)
            window(posterior, first - pr, last - first).scatter_add_(0, voted[None], spread[None])
        if compiled:
            on_slices(votes, (channel.to(torch.int8 if len(values) < 127 else torch.int64).numpy(), w.numpy(),
                              cut.centres.numpy(), order.numpy(), np.asarray(starts, np.int64), scattered, boxes_of[:, 0],
                              boxes_of[:, 1], cut.offsets, (cut.pad - pr).astype(np.int64), int(pr[1]), int(pr[2]),
                              posterior.numpy()), extent[0], torch.get_num_threads())
    posterior = posterior[:-1]
    total = posterior.sum(0)
    keep = total >= 0.1
    posterior = torch.where(keep, posterior / torch.where(keep, total, 1.0), posterior)
    at = cut.centres + torch.from_numpy(pr)
    return posterior[:, at[:, 0], at[:, 1], at[:, 2]].double().numpy()


def solve(m: torch.Tensor) -> torch.Tensor:
    """(C, K, K) -> (C, K): w with m w = 1, negatives set to 0, normalised to sum 1. By Cholesky, as ANTs; where
    it fails, by the pseudo-inverse (ANTs turns to an SVD solve already when the matrix is ill-conditioned; with
    the ridge ``alpha`` on the diagonal of a positive semi-definite M that does not happen for beta = 2)."""
    ones = torch.ones(m.shape[:-1] + (1,), dtype=m.dtype)
    chol, info = torch.linalg.cholesky_ex(m)
    w = torch.cholesky_solve(ones, chol)
    bad = info != 0
    if bool(bad.any()):
        w[bad] = torch.linalg.pinv(m[bad], hermitian=True) @ ones[bad]
    w = torch.clamp(w[..., 0], min=0.0)
    w = w / w.sum(-1, keepdim=True)
    if not bool(torch.isfinite(w).all()):  # a box sum would carry it along the rest of its row
        raise FloatingPointError("joint fusion produced non-finite weights")
    return w
