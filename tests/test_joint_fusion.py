"""Joint label fusion vectorised (transfer/joint_fusion.py) against antsJointFusion itself.

ANTs is the reference: the same inputs go through antspyx and through the vectorised code, and the
posteriors must agree: on the mean difference, and on the labels (with a search, box sums round
differently from ANTs' loops, which can flip a near-tie between two offsets). The inputs are smooth
random volumes with blobs as labels, atlases that are the query plus independent noise (so the weights differ voxel by voxel) and slightly shifted (so the
search has something to find), and a region that reaches the image's edge (patches cut by it).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage

from ants_reference import Reference
from conftest import shared_dataset
from fewshot.transfer.fusion import FusionSettings, _hard, disagreement, joint
from fewshot.transfer.joint_fusion import BoxSums, box_sum, fuse_jointly, search_offsets, window

SPACING = (3.0, 1.0, 1.0)


def problem(seed: int = 0, k: int = 4, shape=(6, 28, 30), scale: float = 100.0, whole: bool = False):
    rng = np.random.default_rng(seed)
    query = (ndimage.gaussian_filter(rng.random(shape), 1.5) * scale).astype(np.float32)
    images, labels = [], []
    for i in range(k):
        shift = rng.integers(-1, 2, size=3) * np.array([0, 1, 1])
        noise = ndimage.gaussian_filter(rng.normal(size=shape), 1.0) * scale * 0.02
        images.append((np.roll(query, tuple(shift), axis=(0, 1, 2)) + noise).astype(np.float32))
        blobs = ndimage.gaussian_filter(rng.random(shape), 2.0)
        labels.append(np.digitize(blobs, np.quantile(blobs, [0.5, 0.8])).astype(np.int64))  # labels 0, 1, 2
    region = np.zeros(shape, bool)
    region[1:-1, 3:, :-4] = True  # reaches the image's edge in rows and columns
    if whole:  # every edge, slices too: searches and patches leave the image everywhere
        region[:] = True
    return query, np.stack(images), np.stack(labels), region


_reference: Reference | None = None


@pytest.fixture(autouse=True, scope="module")
def _reference_process():
    yield
    if _reference is not None:
        _reference.close()


def ants_fusion(query, images, labels, region, patch, search, correlation=False, beta=2.0):
    """antsJointFusion on one ITK thread, in a process of its own: on more it varies run to run."""
    global _reference
    _reference = _reference or Reference()
    return _reference.fuse(query, images, labels, region, SPACING, patch, search, correlation, beta)


def compare(patch, search, correlation=False, seed=0, beta=2.0, whole=False):
    query, images, labels, region = problem(seed, whole=whole)
    reference = ants_fusion(query, images, labels, region, patch, search, correlation, beta)
    values, posteriors = fuse_jointly(query, images, labels, region, SPACING, patch, search, beta, 0.01, correlation)
    ours = dict(zip(values.tolist(), posteriors))
    assert set(reference) <= set(ours) and set(ours) - set(reference) <= {0}  # ANTs writes no background map
    differences = np.stack([np.abs(ours[v] - reference[v]) for v in reference])
    return differences, ours, reference


def winners_agree(ours, reference) -> float:
    """Fraction of voxels where both give the same most probable label."""
    labels = sorted(reference)
    return float((np.argmax(np.stack([ours[v] for v in labels]), 0)
                  == np.argmax(np.stack([reference[v] for v in labels]), 0)).mean())


def test_without_a_search_it_is_ants():
    """Measured: mean differences 0.4-2e-5, the largest 1.1e-3 at single voxels, against ANTs on one thread
    (ANTs divides patches by their true standard deviation, as here, since ITKAdaptiveDenoising 4b6b444,
    2022; before, it floored the deviation at 1; the rest of the gap was not traced).
    ANTs on two threads differs from itself by up to 0.017 between runs (tests/ants_reference.py)."""
    for patch in ((0, 1, 1), (1, 2, 2), (0, 3, 3)):
        differences, _, _ = compare(patch, (0, 0, 0))
        assert differences.max() < 3e-3 and differences.mean() < 1e-4, (patch, differences.max())


@pytest.mark.parametrize("correlation", [False, True], ids=["mean-squares", "correlation"])
def test_with_a_search_it_is_ants_up_to_near_ties(correlation):
    for patch, search in (((0, 2, 2), (1, 1, 1)), ((1, 1, 1), (0, 1, 1))):
        differences, ours, reference = compare(patch, search, correlation)
        assert differences.mean() < 1e-4, (patch, search, differences.mean())  # 0.5-1.6e-5 measured
        assert winners_agree(ours, reference) > 0.99


@pytest.mark.parametrize("beta", [2.0, 1.5])
def test_at_every_edge_of_the_image_it_is_ants(beta):
    """The region is the whole image: patches and searches leave it on every side, slices included."""
    differences, ours, reference = compare((0, 2, 2), (1, 1, 1), beta=beta, whole=True)
    assert differences.mean() < 1e-4, differences.mean()
    assert winners_agree(ours, reference) > 0.99


def test_in_a_flat_area_the_unshifted_patch_wins_the_search():
    """Exact ties: in a flat area every offset scores the same, and the nearest (unshifted) must win, as with
    ANTs' strict comparison. Box sums by cumulative sums round the tied scores apart, so this fails without
    the tie tolerance."""
    from fewshot.transfer.joint_fusion import Cut, search

    query, images, labels, region = problem(6, k=2, shape=(5, 40, 40))
    # float64 intensities: float32 ones square and sum exactly in float64, and would tie exactly anyway
    rng = np.random.default_rng(7)
    query = query + rng.random(query.shape)
    images = images + rng.random(images.shape)
    flat = (slice(1, 4), slice(12, 28), slice(12, 28))
    query[flat] = 37.0
    images[(slice(None),) + flat] = 37.3  # every offset inside scores 0.09 per voxel: the same, rounded apart
    region[:] = False
    region[1:4, 6:34, 6:34] = True  # flat in the middle, varied around it
    cut = Cut.around(query, images, labels, region, (0, 2, 2), (1, 1, 1), SPACING)
    best = search(cut, cut.statistics(cut.query, cut.pad, cut.size), correlation=False)
    inner = tuple(slice(a.start - 1 - int(lo) + pr, a.stop - 1 - int(lo) - pr) if i else slice(0, 3)
                  for i, (a, lo, pr) in enumerate(zip(flat, (1, 6, 6), (0, 3, 3))))
    assert (best[(slice(None),) + inner] == 0).all()


def test_the_search_changes_the_result():
    """The search is not a no-op: without it the fusion differs from ANTs' fusion with it."""
    query, images, labels, region = problem()
    reference = ants_fusion(query, images, labels, region, (0, 2, 2), (1, 1, 1))
    values, posteriors = fuse_jointly(query, images, labels, region, SPACING, (0, 2, 2), (0, 0, 0), 2.0, 0.01)
    unsearched = dict(zip(values.tolist(), posteriors))
    assert np.mean([np.abs(unsearched[v] - reference[v]).mean() for v in reference]) > 1e-2


def test_through_the_presets_fusion_the_two_implementations_agree():
    """fusion.joint with either implementation: the same probabilities per label where atlases disagree, the
    atlases' common vote elsewhere."""
    query, images, labels, _ = problem(1, k=3)
    probabilities = np.stack([np.stack([(lab == v).astype(np.float32) for v in (1, 2)]) for lab in labels])
    settings = FusionSettings(method="joint", beta=2.0, patch_radius=(0, 2, 2), search_radius=(0, 1, 1), rho=0.01,
                              threads=1)
    ants = joint(query, images, probabilities, SPACING, replace(settings, implementation="ants"))
    ours = joint(query, images, probabilities, SPACING, settings)
    assert ours.shape == ants.shape == (2,) + query.shape
    assert np.abs(ours - ants).mean() < 1e-3
    assert ((ours.max(0) > 0.5) == (ants.max(0) > 0.5)).mean() > 0.99
    region = disagreement(_hard(probabilities))
    assert np.array_equal(ours[:, ~region], probabilities.mean(0)[:, ~region])
    with pytest.raises(ValueError, match="nonnegative"):
        joint(query, images, probabilities, SPACING, replace(settings, nonnegative=True))


def plain_search(cut, query_stats):
    """The search by mean squares written plainly: fresh tensors, the best score kept and the bar recomputed from it
    at every offset. The vectorised search must choose exactly the same offsets."""
    from fewshot.transfer.joint_fusion import TIE

    pr, extent = cut.patch, cut.size + 2 * cut.patch
    tq = window(cut.query, cut.pad - pr, extent)
    best = torch.zeros((cut.k,) + tuple(int(c) for c in cut.size), dtype=torch.int64)
    for i in range(cut.k):
        for j, s in enumerate(cut.offsets):
            pair = (window(cut.inside, cut.pad - pr, extent) & window(cut.inside, cut.pad - pr + s, extent)).double()
            n = box_sum(pair, pr)
            landed = window(cut.inside, cut.pad + s, cut.size) & (n >= 3)
            diff = (tq - window(cut.images[i], cut.pad - pr + s, extent)).square() * pair
            score = (box_sum(diff, pr) / n.clamp(min=1)).masked_fill(~landed, torch.inf)
            if j == 0:
                best_score, scale = score, float(torch.nan_to_num(score, posinf=0.0).abs().max())
                continue
            better = score < best_score - TIE * (best_score.abs() + scale)
            best[i][better] = j
            best_score = torch.where(better, score, best_score)
    return best


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("patch", [(0, 2, 2), (1, 2, 2)], ids=["compiled", "torch"])
@pytest.mark.parametrize("whole", [False, True], ids=["inner-region", "every-edge"])
def test_the_search_chooses_what_the_plain_search_chooses(whole, patch, threads, monkeypatch):
    """Buffers, the kept bar, the compiled kernel (patches one slice thick; transfer/joint_kernels.py) and its split
    of the slices among threads change the search's cost, not its choices: the same offsets, bit for bit."""
    from fewshot.transfer import joint_kernels
    from fewshot.transfer.joint_fusion import Cut, search

    query, images, labels, region = problem(5, whole=whole)
    if not whole:
        region[:] = False
        region[2:4, 8:20, 8:22] = True  # far enough from every edge that no patch leaves the image
    cut = Cut.around(query.astype(np.float64), images, labels, region, patch, (1, 2, 2), SPACING)
    assert bool(cut.inside.all()) is not whole  # both of the search's paths: with and without missing pairs
    stats = cut.statistics(cut.query, cut.pad, cut.size)
    calls = []
    monkeypatch.setattr(joint_kernels, "_slices", lambda *a, kernel=joint_kernels._slices: calls.append(a[-2:]) or kernel(*a))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    chosen = search(cut, stats, correlation=False)
    assert torch.equal(chosen, plain_search(cut, stats))
    assert len(torch.unique(chosen)) > 2  # the search moves patches
    # the kernel ran for patches one slice thick only, over every slice, split among the threads
    if patch[0]:
        assert calls == []
    else:
        spans, slices = sorted(set(calls)), len(chosen[0])
        assert len(spans) == min(threads, slices) and spans[0][0] == 0 and spans[-1][1] == slices
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("whole", [False, True], ids=["inner-region", "every-edge"])
def test_the_search_by_correlation_compiled_chooses_what_torch_chooses(whole, threads, monkeypatch):
    """The search by correlation (ANTs' PC), patches one slice thick, compiled (joint_kernels._slices_correlation):
    the same offsets as torch's passes, bit for bit, with and without missing voxel pairs, in 1 and 3 threads;
    and not the offsets mean squares choose (it is the other measure)."""
    from fewshot.transfer import joint_kernels
    from fewshot.transfer.joint_fusion import Cut, search

    query, images, labels, region = problem(5, whole=whole)
    images = images * np.linspace(0.6, 1.4, images.shape[-1])  # a local intensity scale correlation is blind to
    if not whole:
        region[:] = False
        region[2:4, 8:20, 8:22] = True
    cut = Cut.around(query.astype(np.float64), images, labels, region, (0, 2, 2), (1, 2, 2), SPACING)
    assert bool(cut.inside.all()) is not whole
    stats = cut.statistics(cut.query, cut.pad, cut.size)
    calls = []
    kernel = joint_kernels._slices_correlation
    monkeypatch.setattr(joint_kernels, "_slices_correlation", lambda *a: calls.append(a[-2:]) or kernel(*a))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    chosen = search(cut, stats, correlation=True)
    assert len(set(calls)) == min(threads, len(chosen[0]))  # compiled, split among the threads
    assert torch.equal(chosen, search(cut, stats, correlation=True, compiled=False))
    assert len(torch.unique(chosen)) > 2
    assert not torch.equal(chosen, search(cut, stats, correlation=False))


@pytest.mark.parametrize("correlation", [False, True], ids=["mean-squares", "correlation"])
def test_the_compiled_search_scores_only_the_regions_rows_and_chooses_the_same_there(correlation):
    """A region that is not its box (rows of different spans, rows and a slice without any): the compiled search
    scores each row's span only, past offset 0, and its offsets at the region's voxels are those of a search over
    every centre of the box (torch's; and for mean squares the plain reference's); 0 elsewhere."""
    from fewshot.transfer.joint_fusion import Cut, search

    query, images, labels, region = problem(7)
    images = images * np.linspace(0.6, 1.4, images.shape[-1])
    z, y, x = np.ogrid[:6, :28, :30]
    region = ((y - 13) ** 2 / 90 + (x - 14) ** 2 / 60 <= 1) & (z != 3)  # an ellipse on slices 0-2 and 4-5
    region[1, 10:13] = False  # and a band of empty rows in one slice
    region[5, :, :16] = False  # and rows cut short on one side
    cut = Cut.around(query.astype(np.float64), images, labels, region, (0, 2, 2), (1, 2, 2), SPACING)
    mask = cut.region
    assert not bool(mask.all()) and not bool(mask[3].any())
    stats = cut.statistics(cut.query, cut.pad, cut.size)
    chosen = search(cut, stats, correlation=correlation)
    everywhere = search(cut, stats, correlation=correlation, compiled=False)
    assert torch.equal(chosen, everywhere)
    assert bool((chosen[:, ~mask] == 0).all()) and len(torch.unique(chosen[:, mask])) > 2
    if not correlation:
        assert torch.equal(chosen[:, mask], plain_search(cut, stats)[:, mask])


@pytest.mark.parametrize("patch", [(1, 2, 2), (0, 2, 2)], ids=["torch", "compiled"])
@pytest.mark.parametrize("whole", [False, True], ids=["inner-region", "every-edge"])
def test_votes_scattered_per_centre_are_the_box_sums_votes(whole, patch):
    """The two ways a group of centres votes (a box sum over their box, or each centre onto its own patch)
    give the same posteriors, to float32 rounding: all groups one way, all the other, and the default mix.
    With a wide search some offsets are chosen by few centres, which is where the mix matters. With patches one
    slice thick the votes run compiled: the same bits as torch's, every way, in 1 and 3 threads."""
    from fewshot.transfer.joint_fusion import DIRECT, Cut, search, vote, weigh

    query, images, labels, region = problem(4, whole=whole)
    cut = Cut.around(query, images, labels, region, patch, (1, 2, 2), SPACING)
    stats = cut.statistics(cut.query, cut.pad, cut.size)
    chosen, weights = weigh(cut, stats, search(cut, stats, correlation=False), 2.0, 0.01, chunk=97)
    values = np.unique(labels[:, region])
    counts = torch.bincount(chosen.reshape(-1), minlength=len(cut.offsets))
    assert (counts > 0).sum() > 20  # many offsets chosen, most by few centres
    sizes = [int(n) for c in chosen for n in torch.bincount(c) if n]
    assert min(sizes) * DIRECT * cut.patch_size < int(np.prod(cut.size)) < max(sizes) * DIRECT * cut.patch_size  # both ways
    by_box = vote(cut, values, chosen, weights, direct=float("inf"))
    by_centre = vote(cut, values, chosen, weights, direct=0.0)
    mixed = vote(cut, values, chosen, weights)
    assert by_box.shape == (len(values), int(region.sum()))
    assert np.abs(by_centre - by_box).max() < 1e-5 and np.abs(mixed - by_box).max() < 1e-5
    assert np.allclose(by_box.sum(0), 1.0, atol=1e-5)  # every region voxel is voted on
    if patch[0] == 0:
        threads = torch.get_num_threads()
        try:
            for way in (float("inf"), 0.0, None):
                in_torch = vote(cut, values, chosen, weights, direct=way, compiled=False)
                for n in (1, 3):  # the compiled votes split the slices among this many threads
                    torch.set_num_threads(n)
                    assert np.array_equal(vote(cut, values, chosen, weights, direct=way), in_torch)
                torch.set_num_threads(threads)
        finally:
            torch.set_num_threads(threads)


def test_the_label_values_counted_are_numpys_unique():
    from fewshot.transfer.joint_fusion import label_values

    rng = np.random.default_rng(3)
    for votes in (rng.integers(-1, 5, (3, 1000)), np.array([[7, 7, 300]]), np.zeros((1, 4), np.int64),
                  rng.integers(-1, 1 << 30, (2, 50)), rng.integers(0, 4, (2, 9)).astype(np.int16),
                  rng.integers(0, 4, (2, 9)).astype(np.uint8), np.array([[-1, 32767]], np.int16)):
        got, want = label_values(votes), np.unique(votes)
        assert np.array_equal(got, want) and got.dtype == np.int64, (got, want)  # int64 from any integers


@pytest.mark.parametrize("whole", [False, True], ids=["inner-region", "every-edge"])
def test_the_cut_is_the_inputs_padded_then_cropped_around_the_region(whole):
    """``Cut.around`` casts the crop straight into its padded place: the same arrays, types and fill as padding
    the whole inputs by a patch and a search and cropping around the region's box (patches read past the image
    find intensity 0, label -1 and no image), from the hard labels' small unsigned integers too."""
    from fewshot.transfer.joint_fusion import Cut

    query, images, labels, region = problem(2, whole=whole)
    patch, reach = (0, 2, 2), (1, 2, 2)
    cut = Cut.around(query, images, labels.astype(np.uint8), region, patch, reach, SPACING)
    pad = np.add(patch, reach)
    centres = np.argwhere(region)
    lo, hi = centres.min(0), centres.max(0) + 1

    def expected(array, dtype, fill):
        padded = np.pad(array.astype(dtype), [(0, 0)] * (array.ndim - 3) + [(p, p) for p in pad], constant_values=fill)
        return torch.from_numpy(padded[(...,) + tuple(slice(a, b + 2 * p) for a, b, p in zip(lo, hi, pad))])

    for got, want in ((cut.query, expected(query, np.float64, 0.0)), (cut.images, expected(images, np.float64, 0.0)),
                      (cut.labels, expected(labels, np.int16, -1)), (cut.inside, expected(np.ones(query.shape, bool), bool, False))):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert (cut.labels == -1).any() and not cut.inside.all()  # the region reaches the image's edge
    for other in (labels + 40000, labels - 2):  # numbers int16 does not hold, or below -1 (outside's mark): int64
        wide = Cut.around(query, images, other, region, patch, reach, SPACING).labels
        assert wide.dtype == torch.int64 and torch.equal(wide, expected(other, np.int64, -1))


def plain_differences(cut, query_stats, chosen, centres, flat_atlas_patches="centred"):
    """The weights' patch differences (|normalised atlas patch - query's|) and unusable patches of some centres,
    gathered plainly in torch by coordinates: what ``joint_kernels.differences`` must give to the bit. By ANTs'
    rule a flat atlas patch is unusable too."""
    n_t, mean_t, std_t = query_stats
    landing = cut.size + 2 * cut.reach
    n_landing = cut.count(cut.pad - cut.reach, landing)

    def normalised(values, start, centre, mean, std):  # float32, as the weights compute it
        scale = torch.where(std > cut.flat, 1.0 / torch.clamp(std, min=cut.flat), 0.0).float()
        patch = window(values, start + centre - cut.patch, 2 * cut.patch + 1).reshape(-1).float()
        return (patch - mean.float()) * scale

    d = torch.empty((len(centres), cut.k, cut.patch_size), dtype=torch.float32)
    missing = torch.empty((len(centres), cut.k), dtype=torch.bool)
    for row, c in enumerate(centres.numpy()):
        q = normalised(cut.query, cut.pad, c, mean_t[tuple(c)], std_t[tuple(c)])
        for i in range(cut.k):
            s = cut.offsets[int(chosen[i, row])]
            at = tuple(c + cut.reach + s)
            _, mean_a, std_a = cut.statistics(cut.images[i], cut.pad - cut.reach, landing, n_landing)
            d[row, i] = torch.abs(normalised(cut.images[i], cut.pad + s, c, mean_a[at], std_a[at]) - q)
            missing[row, i] = not (n_t[tuple(c)] >= cut.patch_size and std_t[tuple(c)] > cut.flat) or \
                n_landing[at] < cut.patch_size or (flat_atlas_patches == "ants" and not std_a[at] > cut.flat)
    return d, missing


@pytest.mark.parametrize("whole,flat_atlas_patches", [(False, "centred"), (True, "centred"), (True, "ants")],
                         ids=["inner-region", "every-edge", "every-edge-ants-rule"])
def test_the_weights_patch_differences_are_gathered_to_the_bit(whole, flat_atlas_patches, monkeypatch):
    """The compiled gather of the weights' patch differences gives what a plain gather by coordinates gives,
    with either rule for a flat atlas patch (one atlas has no data in a corner of every slice: the last chunk's)."""
    from fewshot.transfer import joint_fusion
    from fewshot.transfer.joint_fusion import Cut, search, weigh

    query, images, labels, region = problem(6, whole=whole)
    images[0, :, -12:, -12:] = 0.0
    cut = Cut.around(query, images, labels, region, (0, 2, 2), (1, 2, 2), SPACING)
    stats = cut.statistics(cut.query, cut.pad, cut.size)
    seen = []

    def spy(*args):
        out = compiled(*args)
        seen.append((args[-4], torch.from_numpy(args[-2].copy()), torch.from_numpy(args[-1].copy())))
        return out

    compiled = joint_fusion.differences
    monkeypatch.setattr(joint_fusion, "differences", spy)
    chosen, _ = weigh(cut, stats, search(cut, stats, correlation=False), 2.0, 0.01, chunk=97,
                      flat_atlas_patches=flat_atlas_patches)
    assert len(seen) == -(-len(cut.centres) // 97)
    start, d, missing = seen[-1]
    centres, mine = cut.centres[start:start + len(d)], chosen[:, start:start + len(d)]
    plain_d, plain_missing = plain_differences(cut, stats, mine, centres, flat_atlas_patches)
    assert torch.equal(d, plain_d) and torch.equal(missing, plain_missing)
    assert bool(missing.any()) and not bool(missing.all())  # the region reaches the image's edge: both kinds
    _, whole_or_query = plain_differences(cut, stats, mine, centres)  # missing by the default rule
    assert bool((missing & ~whole_or_query).any()) == (flat_atlas_patches == "ants")  # the fill's flat patches


def test_an_atlas_identical_to_the_query_takes_the_vote():
    """Where one atlas is the query itself its patch differences are zero: the weights go to it, away from
    atlases whose patches differ."""
    query, images, labels, region = problem(2, k=3)
    noise = np.random.default_rng(3).normal(size=images.shape).astype(np.float32) * float(query.std())
    images = images + noise
    images[1] = query
    values, posteriors = fuse_jointly(query, images, labels, region, SPACING, (0, 2, 2), (0, 1, 1), 2.0, 0.01)
    fused = values[np.argmax(posteriors, 0)]
    assert (fused == labels[1][region]).mean() > 0.97


def test_box_sums():
    a = torch.from_numpy(np.random.default_rng(0).random((5, 12, 13)))
    expected = ndimage.uniform_filter(a.numpy(), size=(3, 5, 7), mode="constant") * (3 * 5 * 7)
    assert np.allclose(box_sum(a, (1, 2, 3)).numpy(), expected[1:-1, 2:-2, 3:-3])
    # Reused buffers: the same bits as box_sum for arrays of any shape up to the largest, views included
    boxes = BoxSums((5, 12, 13), (1, 2, 3))
    for part in (a, a[1:4, 2:, :9], a[:, :7, 3:]):
        assert torch.equal(boxes(part), box_sum(part, (1, 2, 3)))
    assert torch.equal(BoxSums((5, 12, 13), (0, 4, 0))(a), box_sum(a, (0, 4, 0)))
    with pytest.raises(ValueError, match="holds"):
        BoxSums((2, 3, 4), (1, 1, 1))(a)
    with pytest.raises(TypeError, match="float32"):
        BoxSums((5, 12, 13), (1, 2, 3), torch.float32)(a)
    single = a.float()  # the votes' dtype
    assert torch.equal(BoxSums((5, 12, 13), (1, 2, 3), torch.float32)(single), box_sum(single, (1, 2, 3)))


def test_hard_labels_are_argmax_with_ties_to_the_first_label():
    """``_hard`` takes its argmax one label at a time (for speed): the same labels as numpy's argmax, equal
    maxima going to the first label, and nothing where no label passes 0.5."""
    rng = np.random.default_rng(5)
    p = np.round(rng.random((4, 3, 5, 6, 7)) * 4).astype(np.float32) / 4  # quarters: many exact ties
    expected = np.where(p.max(axis=1) > 0.5, p.argmax(axis=1) + 1, 0)
    assert ((p.max(axis=1) > 0.5) & (np.sort(p, axis=1)[:, -1] == np.sort(p, axis=1)[:, -2])).any()  # tied winners
    assert np.array_equal(_hard(p), expected) and _hard(p).dtype == np.uint8
    many = np.zeros((1, 256, 2), np.float32)  # 256 labels: the last one's number needs more than a byte
    many[0, 255, 0], many[0, 3, 1] = 0.9, 0.7
    assert _hard(many).tolist() == [[256, 4]] and _hard(many).dtype == np.uint16


def test_search_order_and_bad_input():
    offsets = search_offsets((1, 1, 1), (3.0, 1.0, 1.0))
    assert len(offsets) == 27 and tuple(offsets[0]) == (0, 0, 0)
    distance = [(3.0 * o[0]) ** 2 + o[1] ** 2 + o[2] ** 2 for o in offsets]
    assert distance == sorted(distance) and {tuple(o) for o in offsets[1:5]} == {(0, 0, 1), (0, 0, -1), (0, 1, 0), (0, -1, 0)}
    q, im, lab, reg = problem(k=2)
    values, posteriors = fuse_jointly(q, im, lab, np.zeros_like(reg), SPACING, (0, 1, 1), (0, 1, 1), 2.0, 0.01)
    assert values.size == 0 and posteriors.size == 0
    im[0, 2, 2, 2] = np.nan
    with pytest.raises(ValueError, match="finite"):
        fuse_jointly(q, im, lab, reg, SPACING, (0, 1, 1), (0, 1, 1), 2.0, 0.01)


def test_on_registered_cardiac_atlases_the_labels_are_ants_labels():
    """Real data: CMR scan 2 with two atlases (scans 3 and 5) registered by the preset (3 slice shifts each:
    6 votes), fused by both. Skipped without ../shared/data."""
    root = shared_dataset("cmr-bssfp")
    from fewshot.config import load_preset
    from fewshot.engine import Engine
    from fewshot.eval.datasets import load_dataset_config

    import fewshot.transfer.fusion as fusion

    ds = load_dataset_config("cmr-bssfp")
    captured = []
    original = fusion.joint

    def capture(query, images, probabilities, spacing, settings):
        captured.append((query, images, probabilities, spacing))
        return original(query, images, probabilities, spacing, settings)

    engine, _ = Engine.from_settings(load_preset("classic", ds.overrides()), label_names=ds.labels)
    try:
        for a in (3, 5):
            engine.ingest(str(a), root / f"image_{a}.nii.gz", root / f"label_{a}.nii.gz")
        fusion.joint = capture
        engine.segment(root / "image_2.nii.gz")
    finally:
        fusion.joint = original
        engine.transfer.close()
    query, images, probabilities, spacing = captured[0]
    # The middle third of the slices (5 of 13): antsJointFusion's time goes with the voxels it fuses (38 s for
    # the whole box, most of this test), and both implementations treat the crop's edges alike (the edge test).
    middle = slice(len(query) // 3, 2 * len(query) // 3 + 1)
    query, images, probabilities = query[middle], images[:, middle], probabilities[:, :, middle]
    region = disagreement(_hard(probabilities))
    assert region.sum() > 1000
    label = lambda p: np.where(p.max(0) > 0.5, p.argmax(0) + 1, 0)  # noqa: E731
    # By either measure, with ANTs' rule for flat atlas patches: antsJointFusion's labels at every fused voxel
    # (measured on the whole box: all 78.6 thousand, mean posterior difference 5e-7 / 8e-6). With the default rule
    # the search by correlation, which lands on this pair's zero fill more often, differs at 0.44 % (docs/results.md).
    for correlation in (False, True):
        settings = replace(engine.transfer.settings.fusion, correlation=correlation)
        ants = joint(query, images, probabilities, spacing, replace(settings, implementation="ants"))
        ours = joint(query, images, probabilities, spacing,
                     replace(settings, implementation="vectorised", flat_atlas_patches="ants"))
        assert np.abs(ours - ants)[:, region].mean() < 1e-4, correlation
        assert (label(ours)[region] == label(ants)[region]).mean() > 0.9999, correlation


def test_an_atlas_with_no_data_in_a_patch_does_not_take_the_vote():
    """A registered atlas is zero where it has no data (past its last slice, outside its field of view). Its
    flat patches are centred, so they differ from the query's and weigh little; antspyx's ANTs divides them
    by their zero deviation, zeroes their row of M and so gives the empty atlas the largest weight."""
    query, images, labels, region = problem(4, k=3)
    noise = np.random.default_rng(5).normal(size=images.shape).astype(np.float32) * float(query.std()) * 0.3
    images = images + noise
    images[0, 2:4] = 0.0  # atlas 0 has no data on slices 2-3 ...
    labels[0, 2:4] = 2  # ... and claims label 2 there
    labels[1:, 2:4] = 1  # the atlases with data say 1
    values, posteriors = fuse_jointly(query, images, labels, region, SPACING, (0, 2, 2), (0, 0, 0), 2.0, 0.01)
    inner = region.copy()
    inner[:2] = inner[4:] = False
    fused = values[np.argmax(posteriors, 0)]
    assert (fused[inner[region]] == 1).mean() > 0.95
    reference = ants_fusion(query, images, labels, region, (0, 2, 2), (0, 0, 0))
    assert (reference[2][inner[region]] > 0.5).mean() > 0.5  # ANTs hands the empty atlas the vote
    # ... and so does ANTs' rule here, to the same posteriors
    values, as_ants = fuse_jointly(query, images, labels, region, SPACING, (0, 2, 2), (0, 0, 0), 2.0, 0.01,
                                   flat_atlas_patches="ants")
    as_ants = dict(zip(values.tolist(), as_ants))
    assert (as_ants[2][inner[region]] > 0.5).mean() > 0.5
    for value, posterior in reference.items():
        np.testing.assert_allclose(as_ants[value], posterior, atol=1e-4)
    with pytest.raises(ValueError, match="centred or ants"):
        fuse_jointly(query, images, labels, region, SPACING, (0, 2, 2), (0, 0, 0), 2.0, 0.01, flat_atlas_patches="nan")


def test_a_searched_flat_patch_by_correlation_weighs_as_in_ants_with_its_rule():
    """Zero fill over parts of slices, searched by correlation: a flat patch scores 0, which beats the
    anticorrelated ones, so the search lands in the fill at some centres. With ANTs' rule those atlases' rows
    of M are zero, as antsJointFusion's NaN makes them: its posteriors; with the default rule, not."""
    query, images, labels, region = problem(6, k=3)
    images[0, 2:4, :, :14] = 0.0
    images[1, 1:3, 10:, :] = 0.0
    reference = ants_fusion(query, images, labels, region, (0, 2, 2), (0, 1, 1), correlation=True)
    fused = {}
    for rule in ("ants", "centred"):
        values, posteriors = fuse_jointly(query, images, labels, region, SPACING, (0, 2, 2), (0, 1, 1), 2.0, 0.01,
                                          correlation=True, flat_atlas_patches=rule)
        fused[rule] = dict(zip(values.tolist(), posteriors))
    difference = {rule: np.stack([np.abs(f[v] - p) for v, p in reference.items()]) for rule, f in fused.items()}
    # Measured: ants 2.2e-5 mean (3 voxels of 2600 off by a near-tie in the search), winners 99.96 %;
    # centred 0.060 mean, winners 93.9 %
    assert difference["ants"].mean() < 1e-4 and winners_agree(fused["ants"], reference) > 0.999
    assert difference["centred"].mean() > 0.01
