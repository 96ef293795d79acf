"""The weights-free `classic` preset: multi-atlas registration and joint label fusion of whole scans.

Most tests run on the committed phantoms (sample-datastore: a liver, a spleen and two kidneys that
share the label `kidney`, 2.5 x 2.5 x 7 mm), so they run on any machine; one also runs on a real
cardiac scan from ../shared/data (skipped when absent).
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from app_harness import PROJECT
from conftest import shared_dataset
from fewshot.config import load_preset
from fewshot.decision import LabelDecision
from fewshot.transfer import atlas_registration as reg
from fewshot.transfer.fusion import FusionSettings, joint, majority
from fewshot.transfer.pieces import count_pieces, expected_pieces, keep_pieces
from fewshot.types import Atlas
from project_scripts import load_script

SAMPLE = PROJECT / "sample-datastore"
LABELS = {"liver": 1, "spleen": 2, "kidney": 3}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def phantom(case: int) -> tuple[str, str]:
    name = f"phantom_{case:02d}.nii.gz"
    return str(SAMPLE / name), str(SAMPLE / "labels" / "final" / name)


def engine_for(tmp_path=None, labels=None, **overrides):
    from fewshot.engine import Engine

    engine, _ = Engine.from_settings(load_preset("classic", overrides), bank_dir=tmp_path, label_names=labels or LABELS)
    return engine


def z_extent(mask: np.ndarray) -> tuple[int, int] | None:
    """First and last slice (last array axis: the phantoms' slicing axis) holding the mask."""
    zs = np.flatnonzero(mask.reshape(-1, mask.shape[-1]).any(axis=0))
    return (int(zs[0]), int(zs[-1])) if len(zs) else None


@pytest.fixture(scope="module")
def inline_engine():
    """Registration in this process: no pool start-up for the tests that do not test the pool."""
    engine = engine_for(**{"transfer.workers": 1})
    yield engine
    engine.transfer.close()


# Every stage of the preset's plan with few iterations, for tests about where and whether a stage runs,
# not how well it registers (the preset's own iterations are what the accuracy tests use).
QUICK_STAGES = {"transfer.global_affine.iterations": 10, "transfer.local_affine.iterations": 10,
                "transfer.mind.iterations": 5, "transfer.mind.spacing_mm": 4.0, "transfer.mind.search": 2,
                "transfer.in_plane.iterations": [10, 5]}


@pytest.fixture(scope="module")
def quick_inline_engine():
    """As ``inline_engine``, registering with ``QUICK_STAGES``."""
    engine = engine_for(**{"transfer.workers": 1, **QUICK_STAGES})
    yield engine
    engine.transfer.close()


# ------------------------------------------------------------------------------------ settings


def test_classic_is_weights_free_multi_atlas():
    from fewshot import weights

    classic = load_preset("classic")
    assert (classic["embedder"]["type"], classic["matcher"]["type"], classic["transfer"]["type"]) == \
        ("descriptor", "none", "atlas")
    assert weights.preset_models(classic) == []
    assert classic["transfer"]["fusion"]["method"] == "joint"
    assert load_preset("classic-slices")["transfer"]["type"] == "registration"  # the previous method, kept


def test_correlation_from_n_atlases_counts_those_holding_the_labels_up_to_keep():
    from types import SimpleNamespace

    from fewshot.transfer.atlas import AtlasTransfer
    from fewshot.transfer.fusion import measure_for

    assert [measure_for(4, n) for n in (1, 3, 4, 8)] == [False, False, True, True]
    assert measure_for(True, 1) is True and measure_for(False, 8) is False
    with pytest.raises(ValueError, match="per bank"):
        measure_for("bank", 5)
    good = load_preset("classic")["transfer"]
    transfer = AtlasTransfer({**good, "fusion": {**good["fusion"], "correlation": 3}})
    try:
        heart, liver = SimpleNamespace(labels=(200, 500)), SimpleNamespace(labels=(1,))
        chosen = lambda atlases, keep: transfer._fusion_for(atlases, (200,), keep)[0].correlation  # noqa: E731
        assert chosen([heart, heart, liver, liver], keep=8) is False  # two hold the labels asked for
        assert chosen([heart] * 3, keep=8) is True
        assert chosen([heart] * 5, keep=2) is False  # no more than keep are fused
    finally:
        transfer.close()


def test_more_than_one_thread_per_worker_is_said_not_to_repeat(caplog):
    from fewshot.transfer.atlas import AtlasTransfer

    good = load_preset("classic")["transfer"]
    for settings, warned in ((good, False), ({**good, "workers": 1, "threads_per_worker": 2}, True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="fewshot.transfer.atlas"):
            AtlasTransfer(settings).close()
        assert any("do not repeat exactly" in r.getMessage() for r in caplog.records) is warned


def test_atlas_settings_reject_what_they_cannot_run():
    from fewshot.config import ConfigError
    from fewshot.transfer.atlas import AtlasTransfer

    good = load_preset("classic")["transfer"]
    for key, value in (("slice_order", "guess"), ("threshold", 1.5), ("decision", "vote"), ("workers", 0)):
        with pytest.raises(ConfigError, match=key.split("_")[0]):
            AtlasTransfer({**good, key: value})
    with pytest.raises(ConfigError, match="fusion"):
        AtlasTransfer({**good, "fusion": {**good["fusion"], "method": "vote"}})
    with pytest.raises(ConfigError, match="nonnegative"):
        AtlasTransfer({**good, "fusion": {**good["fusion"], "nonnegative": "yes"}})
    for fusion, problem in (({"implementation": "itk"}, "implementation"),
                            ({"nonnegative": True}, "nonnegative needs fusion.implementation: ants"),
                            ({"patch_radius": [0, 0, 0]}, "at least 3 voxels"),
                            ({"flat_atlas_patches": "nan"}, "flat_atlas_patches 'nan' must be centred or ants")):
        with pytest.raises(ConfigError, match=problem):
            AtlasTransfer({**good, "fusion": {**good["fusion"], **fusion}})
    AtlasTransfer({**good, "fusion": {**good["fusion"], "nonnegative": True, "implementation": "ants"}}).close()
    for correlation in (1, 0, -3, "4", 2.5, "always"):  # a count of atlases is a whole number from 2
        with pytest.raises(ConfigError, match="fusion.correlation"):
            AtlasTransfer({**good, "fusion": {**good["fusion"], "correlation": correlation}})
    AtlasTransfer({**good, "fusion": {**good["fusion"], "correlation": 2}}).close()
    with pytest.raises(ConfigError, match="deformable"):
        AtlasTransfer({k: v for k, v in good.items() if k != "deformable"})
    with pytest.raises(ConfigError, match="slice_shifts"):
        AtlasTransfer({**good, "in_plane": {**good["in_plane"], "slice_shifts": [-1, 1]}})
    with pytest.raises(ConfigError, match="in_plane.affine"):
        AtlasTransfer({**good, "in_plane": {**good["in_plane"], "affine": "bspline"}})
    with pytest.raises(ConfigError, match="screen.margin must lie in"):
        AtlasTransfer({**good, "screen": {"margin": -0.1}})
    with pytest.raises(ConfigError, match="screen.max_atlases must be 2 or more"):
        AtlasTransfer({**good, "screen": {"margin": 0.05, "max_atlases": 1}})


# ------------------------------------------------------------------------------------ pieces and fusion


def test_pieces_keep_as_many_parts_as_the_atlases_have():
    mask = np.zeros((10, 40, 40), np.uint16)
    mask[2:8, 5:15, 5:15] = 3  # right kidney
    mask[2:8, 5:15, 25:36] = 3  # left kidney, same label
    mask[3:6, 25:35, 5:30] = 1
    mask[0, 39, 39] = 3  # a stray voxel of an annotation is not a piece
    assert count_pieces(mask) == {1: 1, 3: 2}
    assert expected_pieces([{3: 2}, {3: 2}, {3: 1}], 3) == 2 and expected_pieces([{1: 1}], 3) == 1

    mask[0, 39, 39] = 0
    probs = np.zeros((2, 10, 40, 40), np.float32)
    probs[1][mask == 3] = 0.9
    probs[0][mask == 1] = 0.9
    probs[1, 9, 0, 0] = 0.8  # a speck
    kept = keep_pieces(probs, (1, 3), {1: 1, 3: 2}, LabelDecision())
    assert (kept[1][mask == 3] == 0.9).all()  # both kidneys survive
    assert kept[1, 9, 0, 0] == 0 and (kept[0] == probs[0]).all()
    one = keep_pieces(probs, (1, 3), {1: 1, 3: 1}, LabelDecision())
    assert (one[1] > 0.5).sum() == (mask[:, :, 25:] == 3).sum()  # one piece: the largest


def _fusion(method: str = "joint") -> FusionSettings:
    return FusionSettings(method=method, beta=2.0, patch_radius=(1, 2, 2), search_radius=0, rho=0.01, threads=1)


def test_joint_fusion_gives_a_duplicated_atlas_no_extra_vote():
    """Correlation-aware: two atlases that make the same mistake share one vote. A majority (or any
    vote weighting atlases one by one) lets the copy outvote the third atlas."""
    rng = np.random.default_rng(0)
    query = ndimage.gaussian_filter(rng.random((8, 32, 32)), 1.5).astype(np.float32)
    labels_good = np.zeros((8, 32, 32), np.float32)
    labels_good[:, 8:24, 8:24] = 1
    labels_bad = np.zeros_like(labels_good)
    labels_bad[:, 8:24, 14:30] = 1  # shifted: wrong on a band of voxels
    # Patch differences well above the ridge (rho), as between real scans.
    noise = [ndimage.gaussian_filter(rng.normal(size=query.shape), 1.0).astype(np.float32) for _ in range(2)]
    good, bad = query + noise[0], query + noise[1]  # equally (un)like the query, different errors
    spacing = (2.0, 1.0, 1.0)
    two = joint(query, np.stack([good, bad]), np.stack([labels_good, labels_bad])[:, None], spacing, _fusion())
    three = joint(query, np.stack([good, bad, bad]), np.stack([labels_good, labels_bad, labels_bad])[:, None], spacing,
                  _fusion())
    band = (labels_good == 0) & (labels_bad == 1)
    assert np.allclose(majority(np.stack([labels_good, labels_bad, labels_bad])[:, None])[0][band], 2 / 3)
    assert np.allclose(majority(np.stack([labels_good, labels_bad])[:, None])[0][band], 1 / 2)
    # The majority moves by 1/6 when the copy joins; joint fusion barely moves (0.045 measured).
    assert abs(float(three[0][band].mean()) - float(two[0][band].mean())) < 0.08
    # Where the atlases agree, fusion is their common label, untouched.
    agree = (labels_good == 1) & (labels_bad == 1)
    assert (three[0][agree] == 1).all() and (three[0][(labels_good == 0) & (labels_bad == 0)] == 0).all()


def test_an_atlas_variants_merge_by_where_each_matches_the_query():
    """fusion.shifted_votes local: one atlas's variants become one vote, each variant weighing most
    where its own patch matches the query. Variant A is the query on the left half and noise on the
    right, B the reverse; their labels disagree everywhere, so the merged label must follow A on the
    left and B on the right (a plain mean would be 1/2 everywhere)."""
    from fewshot.transfer.fusion import merge_variants

    rng = np.random.default_rng(1)
    query = ndimage.gaussian_filter(rng.random((6, 40, 40)), 1.0).astype(np.float32)
    other = ndimage.gaussian_filter(rng.random((6, 40, 40)), 1.0).astype(np.float32)
    a, b = query.copy(), query.copy()
    a[:, :, 20:] = other[:, :, 20:]
    b[:, :, :20] = other[:, :, :20]
    labels = np.stack([np.ones_like(query), np.zeros_like(query)])[:, None]  # A says 1, B says 0
    image, merged = merge_variants(query, np.stack([a, b]), labels, (1, 2, 2), 2.0)
    assert merged.shape == (1,) + query.shape and image.shape == query.shape
    left, right = merged[0][:, :, :15], merged[0][:, :, 25:]  # away from the seam (patch width 5)
    assert left.min() > 0.95 and right.max() < 0.05
    assert np.abs(image[:, :, :15] - query[:, :, :15]).max() < 0.05
    # One variant: itself, unchanged.
    single_image, single = merge_variants(query, a[None], labels[:1], (1, 2, 2), 2.0)
    assert np.array_equal(single_image, a) and np.array_equal(single, labels[0])


# ------------------------------------------------------------------------------------ registration


def _atlas(image: str, label: str) -> tuple[Atlas, np.ndarray, tuple]:
    """A scan as the bank caches it (its canvas volume and masks), its canvas as a query, and its spacing."""
    from fewshot.engine import Engine
    from fewshot.volume import label_to_canvas, read_label, read_volume

    engine = engine_for(**{"transfer.workers": 1})
    volume = read_volume(image)
    prepared = engine.prepare(volume)
    masks = label_to_canvas(read_label(label, volume), prepared.geometry)
    return Engine.atlas_of("atlas", prepared, masks), np.asarray(prepared.canvas, np.float32), prepared.geometry.spacing


@pytest.fixture(scope="module")
def self_segmented(inline_engine):
    """Phantom 1 as its own only atlas, segmented by the engine in this process: one registration with
    the preset's plan (in-plane refinement and slice shifts included), about 12 s on a free core. The
    engine test reads the segmentation; the two registration tests read that registration, recorded
    on its way through ``place_atlas`` (the arguments the engine gave it: the scan's canvas, its
    spacing, the bank's atlas, the labels and the plan) and out of ``finish_atlas``. Cold: the
    process's registration cache is emptied first, so the engine really registers."""
    from fewshot.transfer import atlas as atlas_step

    image, label = phantom(1)
    place, finish, calls, candidates = atlas_step.reg.place_atlas, atlas_step.reg.finish_atlas, [], []

    def placed(*args, **kwargs):
        calls.append(inspect.signature(place).bind(*args, **kwargs).arguments)
        return place(*args, **kwargs)

    def finished(*args, **kwargs):
        candidates.append(finish(*args, **kwargs))
        return candidates[-1]

    mp = pytest.MonkeyPatch()
    mp.setattr(atlas_step.reg, "place_atlas", placed)
    mp.setattr(atlas_step.reg, "finish_atlas", finished)
    inline_engine.transfer.forget_caches()
    inline_engine.ingest("self", image, label)
    try:
        seg = inline_engine.segment(image)
    finally:
        inline_engine.remove("self")
        mp.undo()
    [args], [candidate] = calls, candidates  # its one atlas, registered once
    canvas, spacing, atlas, labels, plan = (args[k] for k in ("query", "query_spacing", "atlas", "labels", "plan"))
    assert tuple(labels) == (1, 2, 3) and plan == load_transfer_plan()  # the preset's plan
    return seg, (atlas, np.asarray(canvas, np.float32), tuple(spacing), plan, candidate)


@pytest.fixture(scope="module")
def self_registered(self_segmented):
    return self_segmented[1]


def test_in_plane_refinement_is_decided_per_volume_from_its_slice_spacing(self_registered):
    atlas, canvas, spacing, plan, thick = self_registered
    assert spacing[0] >= plan.in_plane.min_slice_mm  # 7 mm phantom slices
    thin_spacing = (2.0,) + tuple(spacing[1:])
    thin_atlas = Atlas(atlas.image_id, atlas.image, atlas.mask, thin_spacing, atlas.components, atlas.key + "-thin")
    thin = reg.register_atlas(canvas, thin_spacing, thin_atlas, (1, 2, 3), plan, None, (False,))  # as the engine would
    assert thick.in_plane and not thin.in_plane
    assert set(thick.stages) == {"global_affine", "local_affine", "deformable", "in_plane"}
    for candidate in (thick, thin):  # an atlas registered to itself lands on itself
        full = np.zeros((3,) + canvas.shape, np.float32)
        full[(slice(None),) + candidate.box] = candidate.probabilities
        for c, value in enumerate((1, 2, 3)):
            assert dice(full[c] > 0.5, atlas.mask == value) >= 0.95, (candidate.in_plane, value)


def test_slice_shifted_variants_vote_as_more_atlases(self_registered):
    """in_plane.slice_shifts [-1, 0, 1]: the atlas registered to itself also offers its slices offset
    by one, each refined against the query slice it faces; the unshifted vote still lands on itself,
    the variants differ from it, and joint fusion of all three keeps every label."""
    from fewshot.transfer.atlas import AtlasSettings, AtlasTransfer

    atlas, canvas, spacing, plan, candidate = self_registered
    # The default, chosen by nested cross-validation: the registration with the preset's plan has them.
    assert plan.in_plane.slice_shifts == (-1, 0, 1)
    assert [s for s, _, _ in candidate.shifted] == [-1, 1] and len(candidate.votes()) == 3
    registered = np.zeros((3,) + canvas.shape, np.float32)
    registered[(slice(None),) + candidate.box] = candidate.probabilities
    assert all(dice(registered[c] > 0.5, atlas.mask == v) >= 0.95 for c, v in enumerate((1, 2, 3)))
    for _, _, p in candidate.shifted:
        assert not np.array_equal(p, candidate.probabilities)
    settings = load_preset("classic")["transfer"]
    transfer = AtlasTransfer({**settings, "workers": 1, "in_plane": {**settings["in_plane"], "slice_shifts": [-1, 0, 1]}})
    assert AtlasSettings.from_settings({**settings, "in_plane": {**settings["in_plane"], "slice_shifts": [-1, 0, 1]}})
    box = candidate.box
    for shifted_votes in ("joint", "local"):  # each variant its own vote, or merged per atlas first
        transfer.settings = replace(transfer.settings, fusion=replace(transfer.settings.fusion, shifted_votes=shifted_votes))
        fused = transfer._fuse(canvas, spacing, box, [candidate], [atlas], (1, 2, 3))
        full = np.zeros((3,) + canvas.shape, np.float32)
        full[(slice(None),) + box] = fused
        for c, value in enumerate((1, 2, 3)):
            assert dice(full[c] > 0.5, atlas.mask == value) >= 0.9, (shifted_votes, value)


def load_transfer_plan() -> reg.RegistrationPlan:
    from fewshot.transfer.atlas import AtlasSettings

    return AtlasSettings.from_settings(load_preset("classic")["transfer"]).registration


def in_workers(function, jobs: dict) -> dict:
    """``function(*args)`` per job in the atlas step's own kind of worker (ANTs single-threaded, as the
    engine runs it): a registration's result in this process would depend on its thread count."""
    from fewshot.transfer.atlas import _init_worker
    from fewshot.transfer.workers import WorkerPool

    pool, results = WorkerPool(2, 1, "spawn", _init_worker, "test", "jobs"), {}
    try:
        assert pool.run(function, jobs, results.__setitem__) == {}
    finally:
        pool.close()
    return results


def test_reversed_slice_order_is_found_only_when_searched():
    """A short-axis stack (8 mm slices) as its own atlas, stored in the other slice order: searched, the
    reversed order wins (it correlates better than any affine of the mirrored stack); trusted, the
    header order stays. Margin 0 here: the preset's margin only guards against a near tie."""
    root = shared_dataset("cmr-bssfp")
    atlas, query, spacing = _atlas(str(root / "image_2.nii.gz"), str(root / "label_2.nii.gz"))
    flipped = Atlas(atlas.image_id, atlas.image[::-1].copy(), atlas.mask[::-1].copy(), atlas.spacing,
                    atlas.components, atlas.key + "-flipped")
    plan = load_transfer_plan()
    search = replace(plan, slice_order="search", slice_order_margin=0.0)
    header = replace(plan, slice_order="header")
    got = in_workers(reg.align_globally, {"found": (query, spacing, flipped, search), "own": (query, spacing, atlas, search),
                                          "kept": (query, spacing, flipped, header)})  # kept: header order trusted
    assert got["found"].reversed_slices and got["found"].similarity > 0.95
    assert not got["own"].reversed_slices
    assert not got["kept"].reversed_slices and got["kept"].similarity < got["found"].similarity


def _body_and_organ(texture_seed: int, organ_sign: int) -> tuple[np.ndarray, np.ndarray]:
    """(8, 96, 96) at 6 x 2 x 2 mm: a body (an ellipse of broad texture, ``texture_seed``) holding a 32 mm organ
    on slices 2-5, bright on its first two slices and dark on the others (``organ_sign`` 1), or the other way
    round (-1), and the organ's label. Broad features, so that they survive the global affine's coarse grid."""
    z, y, x = np.mgrid[:8, :96, :96]
    body = ((y - 48) / 44.0) ** 2 + ((x - 48) / 40.0) ** 2 < 1
    texture = ndimage.gaussian_filter(np.random.default_rng(texture_seed).standard_normal((8, 96, 96)), (0, 6, 6))
    image = np.where(body, 0.45 + 0.16 * texture / texture.std(), 0.0)
    mask = np.zeros((8, 96, 96), np.uint16)
    mask[2:6, 40:56, 50:66] = 1
    image[mask > 0] = np.where(z[mask > 0] < 4, 0.5 + 0.45 * organ_sign, 0.5 - 0.45 * organ_sign)
    return image.astype(np.float32), mask


def test_the_region_correlation_follows_the_slice_order_and_misses_cleanly():
    """``region_correlation`` without a registration: a scan against itself scores near 1 over its organ's region,
    and the same when stored with its slices reversed and read in the reversed order; an atlas whose
    structures the transform moves out of the query, or one with no structures, has no region score."""
    image, mask = _body_and_organ(1, 1)
    spacing = (6.0, 2.0, 2.0)
    coarse = reg.downsample(reg._image(image, spacing), 4)
    identity = sitk.AffineTransform(3)
    own = Atlas("own", image, mask, spacing, {1: 1}, "own")
    itself = reg.region_correlation(coarse, own, False, identity, 20.0)
    assert itself > 0.95  # not 1: the query's grid is smoothed as it is shrunk, the atlas is sampled on it
    stored_reversed = Atlas("reversed", image[::-1].copy(), mask[::-1].copy(), spacing, {1: 1}, "reversed")
    assert reg.region_correlation(coarse, stored_reversed, True, identity, 20.0) == pytest.approx(itself)
    assert reg.region_correlation(coarse, stored_reversed, False, identity, 20.0) < 0.5
    away = sitk.AffineTransform(3)
    away.SetTranslation((1000.0, 0.0, 0.0))  # the query's point x is read from the atlas 1 m away
    assert reg.region_correlation(coarse, own, False, away, 20.0) is None
    empty = Atlas("empty", image, np.zeros_like(mask), spacing, {}, "empty")
    assert reg.region_correlation(coarse, empty, False, identity, 20.0) is None


def test_selection_by_the_region_of_the_structures_prefers_the_atlas_whose_organ_matches(quick_inline_engine):
    """Two atlases on the query's body outline: one with the query's own body and its organ mirrored, one
    with another body's texture and the query's organ. Over whole images the first correlates better (the
    outline and body dominate); over the region its labels come from, the second does, and ``rank_by:
    region`` ranks it first."""
    from fewshot.config import ConfigError
    from fewshot.transfer.atlas import AtlasTransfer

    query, _ = _body_and_organ(1, 1)
    spacing = (6.0, 2.0, 2.0)
    outline = Atlas("outline", *_body_and_organ(1, -1), spacing, {1: 1}, "outline")
    organ = Atlas("organ", *_body_and_organ(2, 1), spacing, {1: 1}, "organ")
    plan = load_transfer_plan()
    got = in_workers(reg.align_globally, {a.image_id: (query, spacing, a, plan, (False,)) for a in (outline, organ)})
    assert got["outline"].rank("image") > got["organ"].rank("image")
    assert got["organ"].rank("region") > got["outline"].rank("region")
    # an atlas whose structures missed the query ranks last by region, and as before by the whole images
    missed = replace(got["organ"], region_similarity=None)
    assert missed.rank("region") == float("-inf") and missed.rank("image") == got["organ"].similarity
    # the preset's selection, one atlas kept of the two: the one whose organ matches
    transfer = quick_inline_engine.transfer
    assert transfer.settings.rank_by == "region"
    result = transfer.segment_with_atlases(query, spacing, [outline, organ], [1], keep=1, cache_key="rank-by-region")
    assert [u.image_id for u in result.atlases] == ["organ"]
    good = load_preset("classic")["transfer"]
    with pytest.raises(ConfigError, match="rank_by 'labels' must be one of image, region"):
        AtlasTransfer({**good, "rank_by": "labels"})


def test_a_lone_atlas_registers_in_the_workers_the_same_as_in_one_piece(monkeypatch):
    """A bank of one scan: its registration runs in the single-threaded workers like any other, split
    into jobs (the 3D stages, then one per slice shift of the in-plane step, side by side), and gives
    bit for bit what all its stages give in one job. In this process with both cores it did not even
    repeat itself (ANTs' multi-threaded mutual information: CHAOS 8 onto 2 scored 0.709 / 0.696 / 0.606
    in three runs)."""
    from fewshot.transfer import atlas as atlas_step

    root = shared_dataset("cmr-bssfp")
    atlas, _, _ = _atlas(str(root / "image_3.nii.gz"), str(root / "label_3.nii.gz"))
    query_scan, query, spacing = _atlas(str(root / "image_2.nii.gz"), str(root / "label_2.nii.gz"))
    labels = (200, 500, 600)
    finish, staged = atlas_step.reg.finish_atlas, []
    monkeypatch.setattr(atlas_step.reg, "finish_atlas", lambda *a: staged.append(finish(*a)) or staged[-1])  # runs here
    # What is compared is where each stage ran: every stage of the preset's plan, with few iterations.
    transfer = atlas_step.AtlasTransfer(dict(load_preset("classic", QUICK_STAGES)["transfer"], workers=2))
    transfer.forget_caches()
    try:
        result = transfer.segment_with_atlases(query, spacing, [atlas], labels, keep=8, directions=query_scan.directions)
        assert transfer.pool._pool is not None and not transfer.pool._failed  # it ran in the workers
    finally:
        transfer.close()
    [candidate] = staged
    assert candidate.in_plane and [s for s, _, _ in candidate.shifted] == [-1, 1]
    assert set(candidate.stages) == {"global_affine", "local_affine", "deformable", "in_plane"}
    orders = reg.slice_orders(transfer.settings.registration, query_scan.directions, atlas.directions)
    assert orders == (False,)  # both stored P,S,R
    whole = in_workers(reg.register_atlas, {0: (query, spacing, atlas, labels, transfer.settings.registration, None, orders)})[0]
    assert candidate.box == whole.box and candidate.alignment == replace(whole.alignment, seconds=candidate.alignment.seconds)
    assert np.array_equal(candidate.image, whole.image) and np.array_equal(candidate.probabilities, whole.probabilities)
    for (s1, i1, p1), (s2, i2, p2) in zip(candidate.shifted, whole.shifted, strict=True):
        assert s1 == s2 and np.array_equal(i1, i2) and np.array_equal(p1, p2)
    assert np.mean([s.probabilities.max() for s in result.slices]) > 0  # and it segments


# ------------------------------------------------------------------------------------ the engine, end to end


def _loaded(modules: tuple[str, ...]) -> tuple[int, list[bool]]:
    """In a worker: its process id, and which of ``modules`` it has imported."""
    import os

    return os.getpid(), [m in sys.modules for m in modules]


def test_a_warm_engine_segments_with_the_workers_and_loops_it_started(tmp_path):
    """``Engine.warm`` (the server at start-up, eval before its first scan) starts both registration workers
    with what their jobs import, and loads joint fusion's compiled loops. The first segmentation then runs
    in those very processes and compiles nothing more: the warm-up fused arrays of a real fusion's types."""
    from fewshot.transfer import joint_kernels

    quick = {"transfer.global_affine.iterations": 5, "transfer.local_affine.iterations": 5,
             "transfer.deformable.method": "mind", "transfer.mind.iterations": 2, "transfer.in_plane.method": "none"}
    engine = engine_for(tmp_path / "bank", **quick)
    search = "_slices_correlation" if engine.transfer.settings.fusion.correlation is True else "_slices"  # the preset's measure
    kernels = lambda: {n: len(getattr(joint_kernels, n).signatures) for n in (search, "differences", "votes")}  # noqa: E731
    try:
        for case in (1, 3):
            engine.ingest(f"p{case}", *phantom(case))
        assert not engine.transfer.pool.processes()  # building and ingesting start nothing
        start = engine.warm()
        assert set(start) == {"workers", "fusion"} and all(s > 0 for s in start.values())
        workers = engine.transfer.pool.processes()
        assert len(workers) == 2
        compiled = kernels()
        assert all(n >= 1 for n in compiled.values()), compiled
        answers = {}
        engine.transfer.pool.run(_loaded, {i: (("ants", "convexAdam"),) for i in range(4)}, answers.__setitem__)
        assert {pid for pid, _ in answers.values()} <= workers
        assert all(all(found) for _, found in answers.values()), answers
        result = engine.segment(phantom(2)[0])
        assert (result.label == LABELS["liver"]).any()
        assert engine.transfer.pool.processes() == workers and kernels() == compiled
        assert engine.warm()["workers"] < start["workers"]  # warm already: nothing to start
    finally:
        engine.transfer.close()


def test_engines_that_register_differently_after_the_global_affine_share_it(monkeypatch):
    """The global affine depends on its own settings (and the slice order) only: an engine with another
    in-plane or deformable setting (a point of an eval --select grid) starts from the one already computed,
    while one with other global-affine settings computes its own. Settings of a deformable method the plan
    does not run do not key its registrations."""
    from fewshot.transfer import atlas as step

    calls = []
    real = reg.align_globally
    monkeypatch.setattr(reg, "align_globally", lambda *a, **k: calls.append(a[2].image_id) or real(*a, **k))
    quick = {"transfer.workers": 1, "transfer.global_affine.iterations": 5, "transfer.local_affine.iterations": 5,
             "transfer.deformable.method": "none", "transfer.in_plane.method": "none"}
    image = phantom(2)[0]

    def segment(**more):
        engine = engine_for(**{**quick, **more})
        for case in (1, 3):
            engine.ingest(f"p{case}", *phantom(case))
        try:
            return engine.segment(image)
        finally:
            engine.transfer.close()

    step.AtlasTransfer(load_preset("classic")["transfer"]).forget_caches()  # the process's caches: other tests'
    segment()
    assert sorted(calls) == ["p1", "p3"]
    other = segment(**{"transfer.in_plane.method": "demons", "transfer.in_plane.iterations": [5, 5]})
    assert sorted(calls) == ["p1", "p3"]  # registered again (another plan), from the same global affines
    assert not any(a["reused"] for a in other.provenance["liver"]["atlases"])
    segment(**{"transfer.global_affine.iterations": 6})
    assert sorted(calls) == ["p1", "p1", "p3", "p3"]
    unused = segment(**{"transfer.global_affine.iterations": 6, "transfer.mind.iterations": 3})  # mind does not run
    assert all(a["reused"] for a in unused.provenance["liver"]["atlases"]) and len(calls) == 4


def test_the_bank_chooses_the_fusion_measure_by_leaving_each_atlas_out(caplog):
    """fusion.correlation: bank. With two atlases each is segmented by the other, both ways; the query is
    then fused by the measure chosen, exactly as an engine set to that measure fuses it; the time is reported
    (choose_fusion) and a second query of the same bank does not choose again, nor one whose bank was prepared
    ahead (Engine.prepare_bank, what the app's bank worker runs after a change). A lone atlas fuses by
    correlation (fusion_choice.ALONE) without leaving anything out."""
    from fewshot.transfer import atlas as step

    quick = {"transfer.workers": 1, "transfer.global_affine.iterations": 5, "transfer.local_affine.iterations": 5,
             "transfer.deformable.method": "none", "transfer.in_plane.method": "none"}
    step.AtlasTransfer(load_preset("classic")["transfer"]).forget_caches()

    def engine(cases, measure):
        e = engine_for(**{**quick, "transfer.fusion.correlation": measure})
        for case in cases:
            e.ingest(f"p{case}", *phantom(case))
        return e

    chooser = engine((1, 3), "bank")
    try:
        with caplog.at_level("INFO", logger="fewshot.transfer.fusion_choice"):
            first = chooser.segment(phantom(2)[0])
        chosen = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fusion measure for this bank")]
        left_out = [r for r in caplog.records if "left out (" in r.getMessage()]
        assert len(chosen) == 1 and len(left_out) == 2, chosen
        correlation = chosen[0].startswith("fusion measure for this bank: correlation")
        assert first.timings["choose_fusion"] > 0
        caplog.clear()
        with caplog.at_level("INFO", logger="fewshot.transfer.fusion_choice"):
            second = chooser.segment(phantom(4)[0])
        assert not [r for r in caplog.records if r.name == "fewshot.transfer.fusion_choice"]  # remembered
        assert second.timings.get("choose_fusion", 0.0) == 0.0
    finally:
        chooser.transfer.close()
    ahead = engine((1, 3), "bank")  # the app's bank worker chooses after a change, before the next Run
    try:
        assert ahead.prepare_bank()["choose_fusion"] > 0
        caplog.clear()
        with caplog.at_level("INFO", logger="fewshot.transfer.fusion_choice"):
            run = ahead.segment(phantom(2)[0])
        assert run.timings["choose_fusion"] == 0.0 and np.array_equal(run.label, first.label)
        assert not [r for r in caplog.records if r.name == "fewshot.transfer.fusion_choice"]
    finally:
        ahead.transfer.close()
    assert engine_for(**quick).prepare_bank() == {}  # nothing to prepare with a fixed measure
    fixed = engine((1, 3), correlation)
    try:
        assert np.array_equal(fixed.segment(phantom(2)[0]).label, first.label)
    finally:
        fixed.transfer.close()
    lone, squares = engine((1,), "bank"), engine((1,), True)
    try:
        alone = lone.segment(phantom(2)[0])
        assert alone.timings["choose_fusion"] == 0.0
        assert np.array_equal(alone.label, squares.segment(phantom(2)[0]).label)
    finally:
        lone.transfer.close()
        squares.transfer.close()


def test_a_number_of_atlases_switches_the_fusion_to_correlation_from_that_count_on(monkeypatch):
    """fusion.correlation: N. A query fused from fewer than N atlases is fused by mean squares, from N on by
    correlation: the measure joint fusion is handed, and labels identical to an engine fixed to that measure."""
    from fewshot.transfer import atlas as step

    quick = {"transfer.workers": 1, "transfer.global_affine.iterations": 5, "transfer.local_affine.iterations": 5,
             "transfer.deformable.method": "none", "transfer.in_plane.method": "none"}
    measures = []
    real_fuse = step.fuse

    def fuse(query, images, probabilities, spacing, settings):
        measures.append(settings.correlation)
        return real_fuse(query, images, probabilities, spacing, settings)

    monkeypatch.setattr(step, "fuse", fuse)

    def segment(cases, measure) -> np.ndarray:
        engine = engine_for(**{**quick, "transfer.fusion.correlation": measure})
        try:
            for case in cases:
                engine.ingest(f"p{case}", *phantom(case))
            measures.clear()
            return engine.segment(phantom(2)[0]).label
        finally:
            engine.transfer.close()

    for cases, expected in (((1,), False), ((1, 3), True)):
        by_rule = segment(cases, 2)
        assert measures and set(measures) == {expected}, (cases, measures)
        assert np.array_equal(by_rule, segment(cases, expected))
    segment((1, 3), 3)  # two atlases, short of three
    assert measures and set(measures) == {False}


def test_a_scan_is_its_own_atlas(self_segmented):
    image, label = phantom(1)
    seg = self_segmented[0]
    truth = np.asarray(nib.load(label).dataobj)
    source = nib.load(image)
    assert seg.label.shape == truth.shape and np.allclose(seg.volume.affine, source.affine)
    for name, value in LABELS.items():
        assert dice(seg.label == value, truth == value) >= 0.95, name
    atlases = seg.provenance["kidney"]["atlases"]
    assert [a["image_id"] for a in atlases] == ["self"] and atlases[0]["similarity"] > 0.95


def moved_phantom(tmp_path, case: int = 1) -> tuple[str, str]:
    """The phantom under a known 3D affine (rotation about two axes, anisotropic scale, shift), on
    the same voxel grid: a new 'patient' whose true label is known exactly."""
    image, label = phantom(case)
    out = []
    transform = sitk.AffineTransform(3)
    rotation = sitk.Euler3DTransform((0, 0, 0), np.deg2rad(3.0), 0.0, np.deg2rad(9.0))
    scale = np.diag([1.07, 0.95, 1.0])
    transform.SetMatrix((np.asarray(rotation.GetMatrix()).reshape(3, 3) @ scale).ravel().tolist())
    # In plane by millimetres; along z by whole 7 mm slices, so that the true label, resampled by nearest
    # neighbour on the same thick-slice grid, is not itself half a slice off.
    transform.SetTranslation((6.0, -5.0, 7.0))
    for path, interpolator in ((image, sitk.sitkLinear), (label, sitk.sitkNearestNeighbor)):
        source = nib.load(path)
        # Physical space of the array with unit direction is enough: the same grid is written back.
        array = np.asarray(source.dataobj).astype(np.float32)
        img = sitk.GetImageFromArray(array.transpose(2, 1, 0).copy())
        zooms = source.header.get_zooms()[:3]
        img.SetSpacing(tuple(float(z) for z in zooms))
        img.SetOrigin(tuple(-(n - 1) / 2 * z for n, z in zip(array.shape, zooms)))  # centred: rotate about the middle
        moved = sitk.GetArrayFromImage(sitk.Resample(img, img, transform, interpolator, 0.0)).transpose(2, 1, 0)
        kind = "image" if path == image else "label"
        target = tmp_path / f"moved_{kind}.nii.gz"
        nib.save(nib.Nifti1Image(moved.astype(source.get_data_dtype()), source.affine), target)
        out.append(str(target))
    return out[0], out[1]


def test_a_known_3d_affine_is_recovered(inline_engine, tmp_path):
    image, label = phantom(1)
    moved_image, moved_label = moved_phantom(tmp_path)
    truth = np.asarray(nib.load(moved_label).dataobj)
    assert dice(np.asarray(nib.load(label).dataobj) == 1, truth == 1) < 0.9  # the move matters
    inline_engine.ingest("original", image, label)
    try:
        seg = inline_engine.segment(moved_image)
    finally:
        inline_engine.remove("original")
    for name, value in LABELS.items():
        assert dice(seg.label == value, truth == value) >= 0.9, name


def extra_phantom(folder, case: int) -> tuple[str, str]:
    """Another phantom from the sample datastore's own generator (the datastore labels three)."""
    maker = load_script("make_sample_datastore")
    image, label, affine = maker.make_case(0, case)
    paths = (folder / "image.nii.gz", folder / "label.nii.gz")
    maker.save(image, affine, paths[0])
    maker.save(label, affine, paths[1])
    return str(paths[0]), str(paths[1])


@pytest.fixture(scope="module")
def cross_subject(tmp_path_factory):
    """Two labelled phantoms segment a third (stored with its in-plane axes flipped), with the
    preset's own worker processes; then a re-run after a new label. Every file opened, here and in
    the workers, is recorded, with a checkpoint waiting in the models directory to be (wrongly) read."""
    from test_classic_slices import audited_init_worker, recorded_opens

    from fewshot.engine import Engine
    from fewshot.transfer import atlas

    tmp = tmp_path_factory.mktemp("cross-subject")
    models = tmp / "models"
    (models / "sam2").mkdir(parents=True)
    (models / "sam2" / "sam2.1_hiera_tiny.pt").write_bytes(b"not a checkpoint")
    extra = extra_phantom(tmp_path_factory.mktemp("p4"), 4)
    image, label = phantom(2)
    mp = pytest.MonkeyPatch()
    mp.setattr(atlas, "_init_worker", audited_init_worker)
    try:
        with recorded_opens(tmp) as audit:
            engine, _ = Engine.from_settings(load_preset("classic"), bank_dir=tmp / "bank", models_dir=models,
                                             label_names=LABELS)
            assert engine.settings["transfer"]["workers"] == 2
            try:
                for case in (1, 3):
                    engine.ingest(f"p{case}", *phantom(case))
                seen = []
                first = engine.segment(image, progress=lambda done, total: seen.append((done, total)))
                engine.ingest("p4", *extra)  # a new label: one more atlas
                second = engine.segment(image)
            finally:
                engine.transfer.close()
    finally:
        mp.undo()
    return first, second, np.asarray(nib.load(label).dataobj), seen, audit.paths, models


def test_two_kidneys_under_one_label_both_survive(cross_subject):
    seg, _, truth, *_ = cross_subject
    kidney = seg.label == LABELS["kidney"]
    pieces, count = ndimage.label(kidney)
    assert count == 2, count
    truth_pieces, truth_count = ndimage.label(truth == LABELS["kidney"])
    assert truth_count == 2
    for t in (1, 2):  # each true kidney is found by one predicted piece
        assert max(dice(pieces == p, truth_pieces == t) for p in (1, 2)) >= 0.7, t


def test_organ_free_slices_stay_empty_and_organs_are_not_cut_short(cross_subject):
    seg, _, truth, *_ = cross_subject
    for name, value in LABELS.items():
        assert dice(seg.label == value, truth == value) >= 0.75, name
        want, got = z_extent(truth == value), z_extent(seg.label == value)
        assert got is not None and abs(got[0] - want[0]) <= 1 and abs(got[1] - want[1]) <= 1, (name, want, got)
    empty = [z for z in range(truth.shape[2]) if not truth[..., z].any()]
    assert empty  # the phantoms have organ-free slices at both ends
    for z in empty:
        if not truth[..., max(0, z - 1): z + 2].any():  # a slice from the nearest organ slice: nothing there
            assert not seg.label[..., z].any(), z


def test_a_new_label_registers_only_its_own_atlas_and_progress_is_reported(cross_subject):
    first, second, _, seen, *_ = cross_subject
    used = {a["image_id"]: a for a in second.provenance["liver"]["atlases"]}
    assert set(used) == {"p1", "p3", "p4"}
    assert used["p1"]["reused"] and used["p3"]["reused"] and not used["p4"]["reused"]
    assert used["p1"]["seconds"] == used["p3"]["seconds"] == 0 and used["p4"]["seconds"] > 0  # not a timing race
    assert seen and seen[-1][0] == seen[-1][1] and len(seen) >= 3


def test_a_stretched_cardiac_atlas_stops_at_the_base_with_the_extent_step():
    """MS-CMRSeg scan 1 (19 slices, ventricles labelled on 1-11, atria above) from scan 5 (13 slices):
    the affine stages stretch the atlas about 2x along z and its ventricles run over the atria, five
    slices and more past the base. With ``extent.method: profile`` every label keeps at most the atlas's
    extent + a slice, no further than two slices past the reference, and the labels overlap it better: by
    5 points of mean Dice with the default search by correlation (0.689 -> 0.743), though the thin myocardium
    can lose a little on this one pair (0.657 -> 0.637; by mean squares every label gained). Nested selection
    chose the step under correlation in every group (docs/results.md, "Joint fusion's search by correlation")."""
    from fewshot.transfer.atlas import AtlasTransfer
    from fewshot.transfer.extent import ExtentSettings

    root = shared_dataset("cmr-bssfp")
    atlas, _, _ = _atlas(str(root / "image_5.nii.gz"), str(root / "label_5.nii.gz"))
    scan, query, spacing = _atlas(str(root / "image_1.nii.gz"), str(root / "label_1.nii.gz"))
    labels = (200, 500, 600)
    transfer = AtlasTransfer(dict(load_preset("classic")["transfer"], extent={"method": "none"}))
    transfer.forget_caches()
    try:
        results = {}
        for method in ("none", "profile"):  # one registration: the step comes after fusion
            transfer.settings = replace(transfer.settings, extent=ExtentSettings(method=method, slack=0.1))
            result = transfer.segment_with_atlases(query, spacing, [atlas], labels, keep=8, directions=scan.directions)
            results[method] = transfer.label_decision.decide(np.stack([s.probabilities for s in result.slices], axis=1))
    finally:
        transfer.close()
    for c, value in enumerate(labels):
        truth = scan.mask == value
        last = int(np.flatnonzero(truth.any(axis=(1, 2)))[-1])
        extents = {m: np.flatnonzero((d == c).any(axis=(1, 2))) for m, d in results.items()}
        assert extents["none"][-1] >= last + 4, value  # the stretch this test is about
        assert extents["profile"][-1] <= last + 2 and len(extents["profile"]) <= len(np.flatnonzero(
            (atlas.mask == value).any(axis=(1, 2)))) + 1, value
        assert dice(results["profile"] == c, truth) > dice(results["none"] == c, truth) - 0.03, value
    mean_dice = {m: np.mean([dice(d == c, scan.mask == v) for c, v in enumerate(labels)]) for m, d in results.items()}
    assert mean_dice["profile"] > mean_dice["none"] + 0.03


def test_a_real_cardiac_scan_is_its_own_atlas():
    """Thick short-axis slices (8 mm): the 2.5D path, on real data."""
    root = shared_dataset("cmr-bssfp")
    image, label = str(root / "image_1.nii.gz"), str(root / "label_1.nii.gz")
    engine = engine_for(labels={"LV-MYO": 200, "LV-BP": 500, "RV": 600}, **{"transfer.workers": 1})
    engine.ingest("cmr-1", image, label)
    seg = engine.segment(image)
    truth = np.asarray(nib.load(label).dataobj)
    for value in (200, 500, 600):
        assert dice(seg.label == value, truth == value) >= 0.95, value


def test_classic_opens_no_weights(cross_subject):
    """Building, ingesting and segmenting with classic opens nothing under the models directory and
    no checkpoint anywhere, in this process or in its registration workers."""
    from test_classic_slices import offending

    *_, opened, models = cross_subject
    assert any(p.endswith("phantom_02.nii.gz") for p in opened)  # the audit sees this process's reads
    assert any("ants" in p.lower() for p in opened)  # ANTs (registration, fusion) loads under the audit too
    assert offending(opened, models) == []


def test_an_atlas_without_a_label_abstains_and_regions_it_does_not_reach_are_not_its_vote():
    """Scans in one datastore often have different structures labelled: an atlas that lacks a label
    must not vote background on it, and an atlas registered on a smaller region has no say beyond it."""
    from fewshot.transfer.atlas import AtlasTransfer
    from fewshot.transfer.atlas_registration import Candidate, GlobalAlignment

    step = AtlasTransfer(dict(load_preset("classic")["transfer"], workers=1))
    rng = np.random.default_rng(1)
    query = ndimage.gaussian_filter(rng.random((6, 40, 40)), 1.0).astype(np.float32)
    full = (slice(0, 6), slice(0, 40), slice(0, 40))
    small = (slice(0, 6), slice(0, 40), slice(0, 20))
    alignment = GlobalAlignment(1.0, False, (1, 0, 0, 0, 1, 0, 0, 0, 1), (0, 0, 0), (0, 0, 0))

    def candidate(name, box, label_1, label_2):
        shape = tuple(s.stop - s.start for s in box)
        probabilities = np.zeros((2,) + shape, np.float16)
        probabilities[0][label_1[:, :, : shape[2]]] = 1
        probabilities[1][label_2[:, :, : shape[2]]] = 1
        return Candidate(name, box, query[box].astype(np.float16), probabilities, (1, 2), alignment, False)

    organ_1 = np.zeros((6, 40, 40), bool)
    organ_1[:, 5:15, 2:12] = True
    organ_2 = np.zeros((6, 40, 40), bool)
    organ_2[:, 20:30, 25:35] = True  # beyond the small atlas's region (columns 0-19)
    both = candidate("both", full, organ_1, organ_2)
    partial = candidate("partial", small, organ_1, np.zeros_like(organ_2))
    holders = [Atlas("both", query, np.zeros((6, 40, 40), np.uint16), (5.0, 1.0, 1.0), {1: 1, 2: 1}, "a"),
               Atlas("partial", query, np.zeros((6, 40, 40), np.uint16), (5.0, 1.0, 1.0), {1: 1}, "b")]
    fused = step._fuse(query, (5.0, 1.0, 1.0), full, [both, partial], holders, (1, 2))
    assert (fused[1][organ_2] == 1).all()  # label 2: only "both" holds it, and it says so
    assert (fused[0][organ_1] == 1).all() and (fused[0][~organ_1] == 0).all()  # label 1: both agree


def test_an_atlas_that_registers_far_worse_than_the_best_is_screened_out_of_the_fusion():
    """A scan as its own atlas beside the same scan mirrored left to right (its organ on the other side, which
    no affine started at the identity undoes). Unscreened, the mirrored atlas has its say in the fused
    probabilities (joint fusion weighs it down locally, not out); with ``screen.margin`` its registered
    correlation is far below the query's own, so it is left out, the provenance says so, and the scan's
    probabilities are those from its own atlas alone, to the bit."""
    from fewshot.transfer.atlas import AtlasTransfer

    query, mask = _body_and_organ(1, 1)
    spacing = (6.0, 2.0, 2.0)
    own = Atlas("own", query, mask, spacing, {1: 1}, "screen-own")
    mirrored = Atlas("mirrored", query[:, :, ::-1].copy(), mask[:, :, ::-1].copy(), spacing, {1: 1}, "screen-mirrored")
    runs = {}
    for name, margin in (("unscreened", "none"), ("screened", 0.05)):
        step = AtlasTransfer(load_preset("classic", {"transfer.workers": 1, "transfer.screen.margin": margin})["transfer"])
        try:  # the second step registers nothing: registrations are shared by the process's steps
            for atlases in ([own, mirrored], [own]):
                result = step.segment_with_atlases(query, spacing, atlases, [1], keep=8, cache_key="screen")
                runs[name, len(atlases)] = (np.stack([s.probabilities for s in result.slices], axis=1), result.atlases)
        finally:
            step.close()
    used = {name: {u.image_id: u.as_dict() for u in runs[name, 2][1]} for name in ("unscreened", "screened")}
    own_use, other = used["screened"]["own"], used["screened"]["mirrored"]
    assert own_use["fused"] and not other["fused"] and all(u["fused"] for u in used["unscreened"].values())
    assert own_use["registered_similarity"] > 0.9 > other["registered_similarity"] + 0.05
    assert used["unscreened"]["mirrored"]["registered_similarity"] == other["registered_similarity"]
    alone = runs["screened", 1][0]
    assert np.array_equal(runs["screened", 2][0], alone) and np.array_equal(runs["unscreened", 1][0], alone)
    assert np.abs(runs["unscreened", 2][0] - alone).max() > 0.05
    assert dice(alone[0] > 0.5, mask == 1) >= 0.95


@pytest.mark.parametrize("stage", ["3D", "in-plane"])
def test_an_atlas_that_fails_to_register_costs_the_scan_only_its_vote(quick_inline_engine, monkeypatch, caplog, stage):
    """In its 3D stages, or in one slice shift of its in-plane step: that atlas is left out, the scan goes on."""
    from fewshot.transfer import atlas

    place, refine, broken = atlas.reg.place_atlas, atlas.reg.refine_shift, []

    def flaky_place(query, spacing, one, *args):
        if stage == "3D" and one.image_id == "broken":
            raise RuntimeError("ITK ran out of memory")
        placed = place(query, spacing, one, *args)
        if one.image_id == "broken":
            broken.append(placed)
        return placed

    def flaky_refine(query_box, before, shift, *args):  # in this process, `before` is a view of the placed atlas
        if shift == 1 and any(np.may_share_memory(before, p.warped) for p in broken):
            raise RuntimeError("ITK ran out of memory")
        return refine(query_box, before, shift, *args)

    monkeypatch.setattr(atlas.reg, "place_atlas", flaky_place)
    monkeypatch.setattr(atlas.reg, "refine_shift", flaky_refine)
    quick_inline_engine.transfer.forget_caches()  # "broken" must really register, not come from the cache
    image, label = phantom(1)
    quick_inline_engine.ingest("self", image, label)
    quick_inline_engine.ingest("broken", *phantom(3))
    try:
        seg = quick_inline_engine.segment(image)
    finally:
        quick_inline_engine.remove("self")
        quick_inline_engine.remove("broken")
    truth = np.asarray(nib.load(label).dataobj)
    assert dice(seg.label == LABELS["liver"], truth == LABELS["liver"]) >= 0.95
    assert f"broken: RuntimeError(ITK ran out of memory) in its {stage} stage" in caplog.text
    assert [a["image_id"] for a in seg.provenance["liver"]["atlases"] if a["seconds"] or a["reused"]] == ["self"]


def test_atlases_are_offered_by_label_and_their_slicing_axis_is_told(inline_engine, caplog):
    """A scan that lacks every requested label is not offered. One whose header names another slicing
    axis still is (half the CMR files name another RAS axis for the same short-axis cut), with a note."""
    inline_engine.ingest("a", *phantom(1))
    inline_engine.ingest("b", *phantom(3))
    try:
        prepared = inline_engine.prepare(phantom(2)[0])
        axis = prepared.geometry.axis
        assert inline_engine.bank.atlas("a").axis == axis
        found = [a.image_id for a in inline_engine.atlases_for(np.zeros((1, 1), np.float32), [1], axis=axis)]
        assert found == ["a", "b"]
        assert inline_engine.atlases_for(np.zeros((1, 1), np.float32), [7], axis=axis) == []
        inline_engine.bank._records["b"]["atlas"]["axis"] = (axis + 1) % 3  # as if b's header said sagittal
        caplog.set_level("INFO", logger="fewshot.engine")
        found = [a.image_id for a in inline_engine.atlases_for(np.zeros((1, 1), np.float32), [1], axis=axis)]
        assert found == ["a", "b"] and "['b'] were sliced along another RAS axis" in caplog.text
    finally:
        inline_engine.remove("a")
        inline_engine.remove("b")


def test_a_cardiac_atlas_stored_in_the_other_orientation_still_segments():
    """CMR scan 7 is stored L,S,P and scan 2 P,S,R (their headers name different RAS slicing axes for
    the same short-axis cut, so their canvas slices run opposite ways, as their labels confirm: the
    left ventricle narrows towards the apex): the preset reads that from the headers and registers the
    atlas reversed, and it is a useful atlas. Measured: Dice 0.46 / 0.77 / 0.76; 0.50 / 0.79 / 0.76 with
    the canvas order trusted (the deformable stages absorb much of a reversal: docs/results.md)."""
    root = shared_dataset("cmr-bssfp")
    engine = engine_for(labels={"LV-MYO": 200, "LV-BP": 500, "RV": 600})  # single-threaded workers: repeatable
    try:
        engine.ingest("cmr-7", root / "image_7.nii.gz", root / "label_7.nii.gz")
        seg = engine.segment(root / "image_2.nii.gz")
    finally:
        engine.transfer.close()
    truth = np.asarray(nib.load(root / "label_2.nii.gz").dataobj)
    scores = [dice(seg.label == v, truth == v) for v in (200, 500, 600)]
    assert [u["reversed_slices"] for u in seg.provenance["LV-BP"]["atlases"]] == [True]
    assert np.mean(scores) > 0.6 and min(scores) > 0.4, scores


def _disc_stack(shifts_mm, pixel_mm=1.25, size=96):
    """(z, y, x) slices with a bright ring (a myocardium-like structure) around a darker disc, each slice
    shifted in plane by its own (dy, dx) in mm: one breath-hold per slice. Image channel + label channel."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32) * pixel_mm
    centre = size * pixel_mm / 2
    images, labels = [], []
    for dy, dx in shifts_mm:
        r = np.hypot(yy - centre - dy, xx - centre - dx)
        ring = (r > 14) & (r < 22)
        images.append(np.where(ring, 1.0, np.where(r <= 14, 0.5, 0.1)) + 0.02 * np.sin(xx / 7.0))
        labels.append(ring.astype(np.float32))
    return np.stack(images).astype(np.float32), np.stack(labels)


def test_in_plane_rigid_step_undoes_breath_hold_shifts_between_slices():
    """Each query slice sits up to 20 mm off where the atlas's slice is (a different breath-hold per
    slice, beyond what the 3D stages undid): the 2D rigid step alone puts each thin ring back, and a
    slice already in place stays in place."""
    shifts = [(0.0, 0.0), (16.0, -10.0), (-12.0, 15.0), (18.0, 8.0)]
    query, query_ring = _disc_stack(shifts)
    atlas_image, atlas_ring = _disc_stack([(0.0, 0.0)] * len(shifts))
    warped = np.stack([atlas_image, atlas_ring])

    def ring_dice(levels, z) -> float:
        out = reg.refine_in_plane(query, warped, levels, 1.25)
        got, truth = out[1, z] > 0.5, query_ring[z] > 0
        return 2 * (got & truth).sum() / (got.sum() + truth.sum())

    off = dict(method="none", shrink_factors=(4, 2), iterations=(60, 40), field_sigma=1.5, min_slice_mm=4.0)
    for z in (1, 2, 3):
        assert ring_dice(reg.InPlaneLevels(**off), z) < 0.3  # the shifted slices, left alone
        assert ring_dice(reg.InPlaneLevels(**off, affine="rigid"), z) > 0.95
    assert ring_dice(reg.InPlaneLevels(**off, affine="rigid"), 0) > 0.98
    found = reg.align_slice(reg._image2d(query[0], 1.25), reg._image2d(atlas_image[0], 1.25), "rigid")
    assert found is None or np.allclose(found.GetParameters(), 0, atol=0.3)


def test_joint_fusion_search_by_correlation_finds_an_atlas_on_another_intensity_scale():
    """fusion.correlation (antsJointFusion -m PC): the local search compares patches by correlation,
    so an atlas whose intensities are the query's on another scale (a bias a global histogram match
    leaves) is found to match, and its label wins the band where the two atlases disagree; by mean
    squares the noisier atlas on the right scale wins more of it. The flags reach ANTs, and the
    fusions stay probabilities."""
    rng = np.random.default_rng(0)
    query = ndimage.gaussian_filter(rng.random((8, 32, 32)), 1.5).astype(np.float32)
    right = np.zeros((8, 32, 32), np.float32)
    right[:, 8:24, 8:24] = 1
    wrong = np.zeros_like(right)
    wrong[:, 8:24, 14:30] = 1
    band = (right == 0) & (wrong == 1)
    scaled = 3.0 * query + 0.5
    noisy = query + 0.5 * ndimage.gaussian_filter(rng.normal(size=query.shape), 1.0).astype(np.float32)
    settings = replace(_fusion(), search_radius=1)

    def fused(**switches):
        return joint(query, np.stack([scaled, noisy]), np.stack([right, wrong])[:, None], (2.0, 1.0, 1.0),
                     replace(settings, **switches))

    squares, pearson = fused(), fused(correlation=True)
    nonnegative = fused(nonnegative=True, implementation="ants")
    assert float(pearson[0][band].mean()) < float(squares[0][band].mean()) - 0.1  # 0.18 against 0.33 measured
    for out in (squares, pearson, nonnegative):
        assert out.min() >= 0 and out.max() <= 1


def _oblique_copy(source: str, degrees: float, path) -> str:
    """``source``'s voxels under an oblique affine: the slice axis (the file's last, 7 mm) runs
    (cos, -sin, 0) in world space, the first axis (sin, cos, 0), the second S. At 40 degrees the
    slice axis is nearest R; at 50, nearest -A, so reorienting to RAS reverses the canvas slices of
    the one and not of the other, though both stacks run within 10 degrees of each other (as the
    CMR files stored P,S,R and L,S,P do)."""
    image = nib.load(source)
    spacing = np.asarray(image.header.get_zooms()[:3], np.float64)
    t = np.deg2rad(degrees)
    affine = np.eye(4)
    affine[:3, :3] = np.stack([[np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0], [np.cos(t), -np.sin(t), 0.0]], 1) * spacing
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), affine), path)
    return str(path)


def test_which_way_oblique_slices_run_is_read_from_their_world_directions(tmp_path):
    """Two copies of one scan whose slice axes snap to RAS axes of opposite sense: their canvases are
    each other's slices reversed, and `geometry` says so from the headers alone (one global affine);
    `header` trusts the canvas order; without directions, or between far from parallel slice axes,
    `geometry` searches."""
    engine = engine_for(**{"transfer.workers": 1})
    a = engine.prepare(_oblique_copy(phantom(1)[0], 40, tmp_path / "a.nii.gz"))
    b = engine.prepare(_oblique_copy(phantom(1)[0], 50, tmp_path / "b.nii.gz"))
    assert (a.geometry.axis, b.geometry.axis) == (0, 1)
    np.testing.assert_allclose(b.canvas, a.canvas[::-1], atol=1e-6)
    np.testing.assert_allclose(a.geometry.directions[0], [np.cos(np.deg2rad(40)), -np.sin(np.deg2rad(40)), 0], atol=1e-6)
    assert np.dot(a.geometry.directions[0], b.geometry.directions[0]) < -0.9  # opposite on the canvases
    assert min(np.dot(u, v) for u, v in zip(a.geometry.directions[1:], b.geometry.directions[1:])) > 0.9  # rows, columns alike
    plan = load_transfer_plan()
    geometry = replace(plan, slice_order="geometry")
    assert reg.slice_orders(geometry, b.geometry.directions, a.geometry.directions) == (True,)
    assert reg.slice_orders(geometry, a.geometry.directions, a.geometry.directions) == (False,)
    assert reg.slice_orders(replace(plan, slice_order="header"), b.geometry.directions, a.geometry.directions) == (False,)
    assert reg.slice_orders(geometry, b.geometry.directions, ()) == (False, True)  # an atlas from an older bank
    across = ((0.0, 0.0, 1.0),) + a.geometry.directions[1:]  # an atlas cut along another axis
    assert reg.slice_orders(geometry, a.geometry.directions, across) == (False, True)
    rows, columns = a.geometry.directions[1:]
    mirrored = (a.geometry.directions[0], tuple(-v for v in rows), columns)  # no slice order lines it up
    assert reg.geometric_order(a.geometry.directions, mirrored) is None
    assert reg.slice_orders(geometry, a.geometry.directions, mirrored) == (False, True)


def test_a_scan_stored_with_the_other_slice_sense_is_its_own_atlas(tmp_path):
    """The copy at 40 degrees is saved as a label (the bank records its canvas directions, and a new
    engine on the same bank reads them back); the copy at 50 degrees, the same voxels whose canvas
    runs the other way, is segmented with `slice_order: geometry`: the atlas is registered reversed
    and gives back its own labels."""
    atlas_image = _oblique_copy(phantom(1)[0], 40, tmp_path / "atlas.nii.gz")
    atlas_label = _oblique_copy(phantom(1)[1], 40, tmp_path / "atlas_label.nii.gz")
    query = _oblique_copy(phantom(1)[0], 50, tmp_path / "query.nii.gz")
    truth = np.asarray(nib.load(phantom(1)[1]).dataobj)
    saving = engine_for(tmp_path / "bank", **{"transfer.workers": 1})
    saving.ingest("atlas", atlas_image, atlas_label)
    recorded = saving.prepare(atlas_image).geometry.directions
    # A margin no correlation can win: only the headers can reverse this atlas.
    engine = engine_for(tmp_path / "bank", **{"transfer.slice_order": "geometry", "transfer.slice_order_margin": 1.0})
    try:
        assert engine.bank.atlas("atlas").directions == recorded
        seg = engine.segment(query)
    finally:
        engine.transfer.close()
    assert all([u["reversed_slices"] for u in seg.provenance[name]["atlases"]] == [True] for name in LABELS)
    scores = [dice(seg.label == v, truth == v) for v in LABELS.values()]
    assert min(scores) >= 0.95, scores
    # An atlas saved before the directions were recorded is stale: the bank's reconcile re-ingests it.
    sources = {"atlas": (atlas_image, atlas_label)}
    assert saving.stale_images(sources) == {}
    del saving.bank._records["atlas"]["atlas"]["directions"]
    assert "no slice directions" in saving.stale_images(sources)["atlas"]
