"""The weights-free `classic-slices` preset (classic before it went multi-atlas, and the 2D transfer
`classic` uses for slice supports): descriptor embedder, NCC matcher, registration label transfer.

Real slices come from ../shared/data (skipped when absent). Canvas slices are built here with a
small helper (percentile-normalised native 256 x 256 slices at 1.25 mm, which is the canvas
geometry already), so these tests do not depend on ``fewshot.volume``.
"""
from __future__ import annotations

import dataclasses
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from conftest import shared_dataset
from fewshot.config import ConfigError, load_preset
from fewshot.embed.descriptor import DescriptorEmbedder
from fewshot.match.ncc import NccMatcher
from fewshot.transfer.registration import (
    RegistrationSettings,
    RegistrationTransfer,
    keep_largest_component,
    smooth_along_z,
    warp_support,
)
from fewshot.types import Embedder, LabelTransfer, Matcher, SlicePlan, Support, SupportRef

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin", ".ckpt")


# ------------------------------------------------------------------------------------ helpers


def canvas_volume(dataset: str, case: int) -> tuple[np.ndarray, np.ndarray]:
    """(Z, 256, 256) float32 slices in [0, 1] (0.5-99.5 percentile window) and uint16 label maps."""
    root = shared_dataset(dataset)
    image = nib.load(root / f"image_{case}.nii.gz").get_fdata(dtype=np.float32)
    label = nib.load(root / f"label_{case}.nii.gz").get_fdata(dtype=np.float32)
    lo, hi = np.percentile(image, [0.5, 99.5])
    image = np.clip((image - lo) / (hi - lo), 0.0, 1.0)
    # The last array axis is the slicing axis (coarsest spacing) in these volumes.
    return np.ascontiguousarray(np.moveaxis(image, -1, 0)), np.ascontiguousarray(np.moveaxis(label, -1, 0).astype(np.uint16))


def richest_slice(masks: np.ndarray) -> int:
    """The slice with the most labelled pixels."""
    return int((masks > 0).reshape(len(masks), -1).sum(axis=1).argmax())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def support(image: np.ndarray, mask: np.ndarray, index: int = 0) -> Support:
    labels = tuple(int(v) for v in np.unique(mask) if v)
    return Support(SupportRef("test", index), image.astype(np.float32), mask.astype(np.uint16), labels)


def prediction(probabilities: np.ndarray, labels) -> np.ndarray:
    """(L, S, S) -> label map: the most probable label where it exceeds 0.5 (the pipeline's rule)."""
    best = probabilities.max(axis=0)
    return np.where(best > 0.5, np.asarray(labels)[probabilities.argmax(axis=0)], 0)


@pytest.fixture(scope="module")
def classic():
    return load_preset("classic-slices")


@pytest.fixture(scope="module")
def transfer(classic):
    """In-process (workers=1): deterministic and no pool start-up in most tests."""
    return RegistrationTransfer(dict(classic["transfer"], workers=1))


# ------------------------------------------------------------------------------------ settings


def test_classic_settings_name_no_foundation_models(classic):
    """Its steps are other types than foundation's: none of foundation's step parameters leak in."""
    from fewshot import weights

    assert (classic["embedder"]["type"], classic["matcher"]["type"], classic["transfer"]["type"]) == \
        ("descriptor", "ncc", "registration")
    for section, foreign in (("embedder", {"model", "input_size"}), ("matcher", {"model"}),
                             ("transfer", {"model", "image_size", "neighbours", "mask_threshold"})):
        assert not foreign & set(classic[section]), (section, classic[section])
    assert weights.preset_models(classic) == []
    foundation = load_preset("foundation")
    assert classic["volume"] == foundation["volume"] and classic["retrieval"] == foundation["retrieval"]
    assert classic["bank"]["augmentations_per_slice"] == 0  # merged sections still merge
    assert classic["bank"]["negatives_per_image"] == foundation["bank"]["negatives_per_image"]


# ------------------------------------------------------------------------------------ descriptor


def test_descriptor_shape_determinism_and_blocks(classic):
    embedder = DescriptorEmbedder(classic["embedder"])
    assert isinstance(embedder, Embedder)
    s = classic["embedder"]
    assert embedder.dim == s["thumbnail"] ** 2 + s["cells"] ** 2 * s["orientations"]
    assert embedder.index_transform == f"PCAW{s['pca_dims']},L2norm"
    rng = np.random.default_rng(0)
    images = ndimage.gaussian_filter(rng.random((5, 256, 256)), (0, 4, 4)).astype(np.float32)
    images[3] = 0.0  # a blank slice must not produce NaNs
    vectors = embedder.embed(images)
    assert vectors.shape == (5, embedder.dim) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    np.testing.assert_array_equal(vectors, embedder.embed(images))
    np.testing.assert_array_equal(vectors[1:2], embedder.embed(images[1:2]))  # batching changes nothing
    thumb = s["thumbnail"] ** 2
    for block in (vectors[[0, 1, 2, 4], :thumb], vectors[[0, 1, 2, 4], thumb:]):
        np.testing.assert_allclose(np.linalg.norm(block, axis=1), 1.0, atol=1e-3)
    # Brightness and contrast changes leave the descriptor (nearly) unchanged.
    np.testing.assert_allclose(embedder.embed(0.5 * images[:1] + 0.2), vectors[:1], atol=1e-3)


def test_descriptor_retrieves_own_slice_after_pca_whitening(classic):
    import faiss

    images, _ = canvas_volume("chaos-t2", 1)
    embedder = DescriptorEmbedder(classic["embedder"])
    vectors = embedder.embed(images)
    index = faiss.index_factory(embedder.dim, "PCAW16,L2norm,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    _, rows = index.search(vectors, 1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(len(images)))
    # A slightly shifted, noisy copy still finds its own slice among the volume's others.
    rng = np.random.default_rng(1)
    moved = np.stack([ndimage.shift(x, (3, -2), order=1) for x in images])
    moved = np.clip(moved + rng.normal(0, 0.01, moved.shape), 0, 1).astype(np.float32)
    _, rows = index.search(embedder.embed(moved), 1)
    assert (rows[:, 0] == np.arange(len(images))).mean() >= 0.9


def test_descriptor_rejects_incomplete_settings():
    with pytest.raises(ConfigError, match="thumbnail"):
        DescriptorEmbedder({"type": "descriptor", "orientations": 8})


# ------------------------------------------------------------------------------------ NCC matcher


def test_ncc_ranks_the_query_and_a_moved_copy_first(classic):
    matcher = NccMatcher(classic["matcher"])
    assert isinstance(matcher, Matcher)
    images, _ = canvas_volume("cmr-bssfp", 1)
    z = len(images) // 2
    query = images[z]
    others = np.stack([x for k, x in enumerate(images) if abs(k - z) > 1])
    d = matcher.distances(query, np.concatenate([others, query[None]]))
    assert d.shape == (len(others) + 1,) and d.dtype == np.float32
    assert int(np.argmin(d)) == len(others) and d[-1] < 1e-3
    # Rotated by 5 degrees and shifted 8 pixels: the rigid search aligns it back.
    moved = ndimage.shift(ndimage.rotate(query, 5, reshape=False, order=1), (8, -8), order=1)
    d = matcher.distances(query, np.concatenate([others, moved[None]]))
    assert int(np.argmin(d)) == len(others) and d[-1] < 0.02
    unaligned = 1.0 - np.corrcoef(query.ravel(), moved.ravel())[0, 1]
    assert unaligned > 10 * d[-1]
    # A blank candidate is as far as can be, and no candidates give no distances.
    assert matcher.distances(query, np.zeros((1, 256, 256), np.float32))[0] == pytest.approx(1.0)
    assert matcher.distances(query, np.zeros((0, 256, 256), np.float32)).shape == (0,)


# ------------------------------------------------------------------------------------ registration


@pytest.mark.parametrize("dataset", ["chaos-t2", "cmr-bssfp"])
def test_own_label_as_only_support_is_reproduced(transfer, dataset):
    images, masks = canvas_volume(dataset, 1)
    z = richest_slice(masks)
    labels = [int(v) for v in np.unique(masks) if v]
    plan = SlicePlan(0, [support(images[z], masks[z], z)], tuple(int(v) for v in np.unique(masks[z]) if v))
    result = transfer.segment_volume(images[z : z + 1], [plan], labels)
    assert result.labels == tuple(labels)
    sres = result.slices[0]
    assert sres.probabilities.shape == (len(labels), 256, 256) and sres.probabilities.dtype == np.float32
    assert set(sres.seconds) >= {"register", "fuse"} and set(result.seconds) >= {"register", "fuse"}
    pred = prediction(sres.probabilities, labels)
    for c, v in enumerate(labels):
        if v in plan.labels:
            assert dice(pred == v, masks[z] == v) >= 0.95, v
            assert sres.object_scores[c] > 0
        else:
            assert not sres.probabilities[c].any() and sres.object_scores[c] < 0


def test_known_affine_transform_is_recovered(transfer):
    images, masks = canvas_volume("chaos-t2", 1)
    z = richest_slice(masks)
    query, truth = images[z], masks[z]
    # support = query under rotation 10 deg, scale 1.1 and a shift, about the canvas centre.
    angle, scale, shift = np.deg2rad(10.0), 1.1, np.array([9.0, -7.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = rotation / scale  # output -> input coordinates, as ndimage.affine_transform wants
    centre = np.array(query.shape) / 2.0
    offset = centre - matrix @ (centre + shift)
    moved_image = ndimage.affine_transform(query, matrix, offset, order=1).astype(np.float32)
    moved_mask = ndimage.affine_transform(truth, matrix, offset, order=0).astype(np.uint16)
    labels = [int(v) for v in np.unique(truth) if v]
    before = dice(moved_mask > 0, truth > 0)
    plan = SlicePlan(0, [support(moved_image, moved_mask)], tuple(labels))
    result = transfer.segment_volume(query[None], [plan], labels)
    pred = prediction(result.slices[0].probabilities, labels)
    assert before < 0.8  # the transform is big enough to matter
    assert dice(pred > 0, truth > 0) >= 0.9
    for v in labels:
        if (truth == v).sum() > 500:  # small structures lose a few edge pixels to the resampling
            assert dice(pred == v, truth == v) >= 0.9, v


def _disc(shape, centre, radius) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def test_local_affine_moves_a_small_organ_the_body_outline_does_not(classic):
    """Support and query share the body outline; only the small organ sits 6 and 8 pixels apart (the
    heart in a short-axis slice). The whole-slice affine aligns the outline and leaves the organ off;
    the local affine, its metric on the support's labelled region, puts it on the query's."""
    shape = (128, 128)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    body = np.where(((yy - 64) / 50.0) ** 2 + ((xx - 64) / 40.0) ** 2 <= 1, 0.4, 0.0).astype(np.float32)
    query, support_image = body.copy(), body.copy()
    query[_disc(shape, (58, 56), 9)] = 1.0
    support_image[_disc(shape, (64, 64), 9)] = 1.0
    mask = _disc(shape, (64, 64), 9).astype(np.uint16) * 3
    truth = _disc(shape, (58, 56), 9)
    settings = RegistrationSettings.from_settings(dict(classic["transfer"], workers=1))
    affine_only = dataclasses.replace(settings, deformable=dataclasses.replace(settings.deformable, method="none"))
    variants = {method: dataclasses.replace(affine_only, local_affine=dataclasses.replace(affine_only.local_affine, method=method))
                for method in ("none", "affine")}
    scores = {method: dice(warp_support(query, support_image, mask, [3], chosen)[1][0] > 0.5, truth)
              for method, chosen in variants.items()}
    assert scores["none"] < 0.5  # the premise: the outline decides the whole-slice affine
    assert scores["affine"] >= 0.95
    # A support slice without the label has no region: the global affine is kept as it is.
    empty = np.zeros_like(mask)
    warped_local, _ = warp_support(query, support_image, empty, [3], variants["affine"])
    warped_global, _ = warp_support(query, support_image, empty, [3], variants["none"])
    np.testing.assert_array_equal(warped_local, warped_global)


def test_labels_not_in_the_plan_stay_empty(transfer):
    images, masks = canvas_volume("cmr-bssfp", 1)
    z = richest_slice(masks)
    labels = [int(v) for v in np.unique(masks) if v]
    assert len(labels) >= 2
    same = [support(images[z], masks[z], z)]
    # Slice 1 allows only the first label, slice 2 none: its neighbours' maps must not leak in
    # through the z smoothing, although every support contains every label.
    plans = [
        SlicePlan(0, same, tuple(labels)),
        SlicePlan(1, same, (labels[0],)),
        SlicePlan(2, same, ()),
    ]
    result = transfer.segment_volume(np.stack([images[z]] * 3), plans, labels)
    p0, p1, p2 = (s.probabilities for s in result.slices)
    assert all(p0[c].max() > 0.5 for c in range(len(labels)))
    assert p1[0].max() > 0.5
    assert not p1[1:].any() and not p2.any()
    assert (result.slices[2].object_scores < 0).all()
    assert result.slices[2].seconds["register"] == 0.0  # nothing allowed: nothing registered


# ------------------------------------------------------------------------------------ the engine, end to end

_OPEN_LOG_ENV = "FEWSHOT_TEST_OPEN_LOG"
_recorders: list[list[str]] = []  # audit hooks cannot be removed: one hook, appending to the active recorders


def _record_open(event, args):
    if event == "open" and _recorders and args and isinstance(args[0], (str, bytes)):
        path = args[0] if isinstance(args[0], str) else args[0].decode(errors="replace")
        for recorder in _recorders:
            recorder.append(path)


class recorded_opens:
    """Every file this process opens through Python while the block runs, plus (via the registration
    worker initializer below) every file the worker processes open after they start."""

    installed = False

    def __init__(self, tmp_path):
        self.paths: list[str] = []
        self.log = tmp_path / "worker-opens.log"

    def __enter__(self):
        import os

        if not recorded_opens.installed:
            sys.addaudithook(_record_open)
            recorded_opens.installed = True
        self.log.write_text("")
        os.environ[_OPEN_LOG_ENV] = str(self.log)  # spawned workers inherit it
        _recorders.append(self.paths)
        return self

    def __exit__(self, *exc):
        import os

        _recorders.remove(self.paths)
        os.environ.pop(_OPEN_LOG_ENV, None)
        self.paths.extend(line for line in self.log.read_text().splitlines() if line)


def audited_init_worker(threads: int) -> None:
    """Registration worker initializer (imported by name in each spawned worker): the real one, plus an
    audit hook that logs the worker's opens through a descriptor opened before the hook exists."""
    import os

    import SimpleITK

    SimpleITK.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    path = os.environ.get(_OPEN_LOG_ENV)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)

        def hook(event, args):
            if event == "open" and args and isinstance(args[0], (str, bytes)):
                name = args[0] if isinstance(args[0], str) else args[0].decode(errors="replace")
                os.write(fd, (name + "\n").encode())

        sys.addaudithook(hook)


def offending(paths: list[str], models_dir) -> list[str]:
    """Opened files that are weights: anything under the models directory, or a checkpoint anywhere."""
    from pathlib import Path

    root = Path(models_dir).resolve()
    out = []
    for p in paths:
        resolved = Path(p).resolve() if p else Path(p)
        if resolved == root or root in resolved.parents or p.lower().endswith(CHECKPOINT_SUFFIXES):
            out.append(p)
    return out


def cmr_slab(tmp_path, case: int = 1, z0: int = 8, z1: int = 14):
    """Slices z0..z1-1 of a CMR scan (4 with the heart, then 2 below it), written with their geometry."""
    data = shared_dataset("cmr-bssfp")
    paths = []
    for kind in ("image", "label"):
        full = nib.load(data / f"{kind}_{case}.nii.gz")
        path = tmp_path / f"{kind}_{case}.nii.gz"
        nib.save(full.slicer[:, :, z0:z1], path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def tiny_engine_opens(tmp_path_factory, models_dir):
    """What building a weights-loading preset opens, under the same audit: the check can fail."""
    from fewshot.engine import Engine

    with recorded_opens(tmp_path_factory.mktemp("audit-tiny")) as audit:
        Engine.from_settings(load_preset("random-tiny"), models_dir=models_dir)
    return audit.paths


@pytest.fixture(scope="module")
def classic_self_segmentation(tmp_path_factory, models_dir, tiny_engine_opens):
    """Engine.from_settings(classic) -> ingest a real scan with its label -> segment the SAME scan, with
    the preset's two registration workers, every open of this process and of the workers recorded.
    Depends on tiny_engine_opens so that the models directory holds checkpoints to (wrongly) open."""
    from fewshot.engine import Engine
    from fewshot.transfer import registration

    tmp = tmp_path_factory.mktemp("classic-engine")
    image, label = cmr_slab(tmp)
    mp = pytest.MonkeyPatch()
    mp.setattr(registration, "_init_worker", audited_init_worker)
    try:
        with recorded_opens(tmp) as audit:
            engine, _ = Engine.from_settings(load_preset("classic-slices"), models_dir=models_dir,
                                             label_names={"LV-MYO": 200, "LV-BP": 500, "RV": 600})
            assert engine.settings["transfer"]["workers"] == 2
            engine.ingest("cmr-1", image, label)
            seg = engine.segment(image)
            engine.transfer.close()
    finally:
        mp.undo()
    return seg, np.asarray(nib.load(label).dataobj), audit.paths


def test_classic_engine_reproduces_a_scan_from_its_own_label(classic_self_segmentation):
    """Retrieval, NCC, registration, fusion, presence vote, 3D consistency and the canvas mapping
    together leave an image segmented from itself as it was labelled (registration to itself is
    the identity); the two slices below the heart stay empty although four of their five supports
    hold every label."""
    seg, truth, _ = classic_self_segmentation
    assert seg.label.shape == truth.shape
    for value in (200, 500, 600):
        assert dice(seg.label == value, truth == value) >= 0.95, value
    for z in range(truth.shape[2]):
        if not truth[..., z].any():
            assert not seg.label[..., z].any(), z
    assert seg.timings["register"] > 0 and not seg.timings.get("reused")


def test_classic_engine_opens_no_weights(classic_self_segmentation, tiny_engine_opens, models_dir):
    """Building, ingesting and segmenting with classic opens nothing under the models directory and no
    checkpoint anywhere, in this process or its workers; the same audit catches random-tiny."""
    _, _, opened = classic_self_segmentation
    assert any(p.endswith("image_1.nii.gz") for p in opened)  # the audit sees this process's reads
    assert offending(opened, models_dir) == []
    caught = offending(tiny_engine_opens, models_dir)
    assert any(p.lower().endswith(CHECKPOINT_SUFFIXES) for p in caught), tiny_engine_opens[-20:]


def test_worker_audit_records_worker_opens(tmp_path, classic, monkeypatch):
    """The worker side of the audit is live: what a registration worker opens reaches the record."""
    from pathlib import Path

    from fewshot.transfer import registration

    monkeypatch.setattr(registration, "_init_worker", audited_init_worker)
    step = RegistrationTransfer(dict(classic["transfer"], workers=2))
    try:
        with recorded_opens(tmp_path) as audit:
            assert step.pool.executor().submit(Path(__file__).read_bytes).result()
            opened_here = list(audit.paths)
        assert __file__ not in opened_here  # not this process ...
        assert __file__ in audit.paths  # ... a worker
    finally:
        step.close()


def test_process_pool_gives_the_same_result_and_is_started_once(classic, transfer, monkeypatch):
    from fewshot.transfer import workers

    started = []

    class CountingPool(workers.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            started.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(workers, "ProcessPoolExecutor", CountingPool)
    images, masks = canvas_volume("cmr-bssfp", 1)
    zs = [z for z in range(len(images)) if masks[z].any()][2:5]
    labels = [int(v) for v in np.unique(masks) if v]
    plans = [SlicePlan(i, [support(images[zs[(i + 1) % 3]], masks[zs[(i + 1) % 3]]),
                           support(images[zs[(i + 2) % 3]], masks[zs[(i + 2) % 3]])], tuple(labels))
             for i in range(3)]
    seen = []
    pooled_step = RegistrationTransfer(dict(classic["transfer"], workers=2))
    try:
        pooled = pooled_step.segment_volume(images[zs], plans, labels,
                                            progress=lambda done, total: seen.append((done, total)))
        # A second volume (alpnet: the next organ or query) reuses the running workers.
        again = pooled_step.segment_volume(images[zs], plans, labels)
        assert len(started) == 1
    finally:
        pooled_step.close()
    assert started[0]._shutdown_thread  # close() stopped the workers
    inline = transfer.segment_volume(images[zs], plans, labels)
    assert seen[-1] == (3, 3)
    for a, b in zip(pooled.slices, inline.slices):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
    for a, b in zip(again.slices, pooled.slices):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)


# ------------------------------------------------------------------------------------ step contract and 3D rules


def test_fingerprint_and_encode_supports(classic):
    transfer = RegistrationTransfer(classic["transfer"])
    assert isinstance(transfer, LabelTransfer)
    assert transfer.fingerprint() == "registration-v1"
    assert transfer.fingerprint() == RegistrationTransfer(dict(classic["transfer"], workers=1)).fingerprint()
    # It names what the bank stores (nothing of its own), not how masks are fused: a run with other
    # fusion or 3D-consistency settings shares the bank (issue 13).
    changed = dict(classic["transfer"], fusion=dict(classic["transfer"]["fusion"], h=0.5),
                   consistency=dict(classic["transfer"]["consistency"], largest_component=False))
    assert RegistrationTransfer(changed).fingerprint() == transfer.fingerprint()
    assert transfer.encode_supports(np.zeros((2, 8, 8), np.float32), np.zeros((2, 8, 8), np.uint16), [1]) == {}
    with pytest.raises(ConfigError, match="deformable"):
        RegistrationTransfer({k: v for k, v in classic["transfer"].items() if k != "deformable"})


def test_presence_vote_weighs_supports_by_global_similarity(classic):
    from fewshot.transfer.registration import FusionStage, presence_vote

    stage = FusionStage(**dict(classic["transfer"]["fusion"]))
    query = np.zeros((8, 8), np.float32)
    # One support identical to the query, without the label; three others, each holding it, with a
    # mean squared difference of 2 h: weights 1 vs 3 exp(-2) = 0.41, so the label is absent.
    warped = np.stack([query] + [query + np.sqrt(2 * stage.h)] * 3)
    holds = np.array([[False], [True], [True], [True]])
    assert not presence_vote(query, warped, holds, stage)[0]
    assert presence_vote(query, warped, holds, FusionStage(stage.window_sigma, stage.h, "any"))[0]
    # Equally similar supports: a plain majority.
    assert presence_vote(query, np.stack([query] * 4), holds, stage)[0]


def test_z_smoothing_respects_allowed_slices():
    probs = np.zeros((4, 1, 4, 4), np.float32)
    probs[:, 0] = 1.0
    allowed = np.array([[True], [True], [True], [False]])
    out = smooth_along_z(probs, allowed, (0.25, 0.5, 0.25))
    np.testing.assert_allclose(out[:3], 1.0)  # renormalised over allowed neighbours: not diluted
    assert not out[3].any()  # nor spread into a slice where the label is absent
    probs[1] = 0.0
    out = smooth_along_z(probs, allowed, (0.25, 0.5, 0.25))
    np.testing.assert_allclose(out[1, 0], 0.5)
    np.testing.assert_allclose(out[0, 0], 2 / 3, rtol=1e-6)


def test_largest_component_keeps_the_main_chain():
    probs = np.zeros((3, 1, 16, 16), np.float32)
    probs[:, 0, 2:8, 2:8] = 0.9  # a chain through all slices
    probs[1, 0, 12:14, 12:14] = 0.8  # a small island
    probs[1, 0, 10, 10] = 0.3  # below threshold: not a component, left alone
    out = keep_largest_component(probs, 0.5)
    assert (out[:, 0, 2:8, 2:8] == 0.9).all()
    assert not out[1, 0, 12:14, 12:14].any()
    assert out[1, 0, 10, 10] == pytest.approx(0.3)


def test_carry_takes_a_label_from_its_given_slices_through_its_own_scan(transfer):
    """`carry` (the propagated alpnet support): the blood pool of CMR scan 2 (label 500) given on the
    protocol's three slices, carried over the extent those imply. The given slices keep their masks
    exactly, slices outside the span stay empty, and the carried slices overlap the reference
    (measured: 0.915 mean Dice over its 8 carried slices; 0.75 leaves room for registration's spread)."""
    from fewshot.eval import protocols

    image, masks = canvas_volume("cmr-bssfp", 2)
    truth = masks == 500
    zs = protocols.support_slice_per_chunk(protocols.organ_chunks(truth.any(axis=(1, 2)), 3))
    span = protocols.implied_extent(zs, len(image))
    given = {z: np.where(truth[z], 500, 0).astype(np.uint16) for z in zs}
    probs = transfer.carry(image, given, 500, span)
    assert probs.shape == image.shape
    for z in zs:
        assert np.array_equal(probs[z] > 0.5, truth[z])
    outside = [z for z in range(len(image)) if not span[0] <= z <= span[1]]
    assert outside and not probs[outside].any()
    carried = [z for z in range(span[0], span[1] + 1) if z not in zs and truth[z].any()]
    assert len(carried) >= 5
    assert np.mean([dice(probs[z] > 0.5, truth[z]) for z in carried]) >= 0.75
