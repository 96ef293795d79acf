"""The whole engine on real volumes with the random-tiny preset: geometry, bank life cycle, conditioning,
caching and bad input. Random weights give garbage masks, so these test mechanics, never quality."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import PROJECT, make_datastore, shared_dataset
from fewshot.folders import labelled, scan_datastore
from fewshot.engine import Engine
from fewshot.volume import VolumeError


@pytest.fixture(scope="module")
def chaos():
    return shared_dataset("chaos-t2")


@pytest.fixture(scope="module")
def cmr():
    return shared_dataset("cmr-bssfp")


@pytest.fixture()
def engine_factory(tiny_settings, tmp_path):
    def make(bank_dir=None, settings=None):
        engine, report = Engine.from_settings(settings or tiny_settings, bank_dir=bank_dir)
        return engine, report

    return make


def _labels_of(path) -> set[int]:
    return {int(v) for v in np.unique(np.asarray(nib.load(str(path)).dataobj)) if v}


def _force_presence(engine) -> None:
    """Random weights put SAM 2's object score near 0, so masks often hide behind "absent"; push it
    to "present" so that the output shows what the supports allow."""
    import torch

    with torch.no_grad():
        engine.transfer.model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(10.0)


def test_segment_keeps_geometry_and_support_labels(engine_factory, chaos, cmr, tmp_path):
    """Volumes of different shape, spacing and orientation come back with their own shape and affine;
    every label is a support label, and none is put on a slice whose chosen supports lack it."""
    # CMR image_10 is LSP: its file slices run against the canvas's RAS order.
    for root, support_case, query_case in ((chaos, "1", "2"), (cmr, "1", "10")):
        engine, _ = engine_factory()
        _force_presence(engine)
        engine.ingest(f"s{support_case}", root / f"image_{support_case}.nii.gz", root / f"label_{support_case}.nii.gz")
        seg = engine.segment(root / f"image_{query_case}.nii.gz")
        out = tmp_path / f"{root.name}.nii.gz"
        sidecar = seg.save(out)
        written, source = nib.load(str(out)), nib.load(str(root / f"image_{query_case}.nii.gz"))
        assert written.shape == source.shape
        np.testing.assert_array_equal(written.affine, source.affine)
        assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(source.affine)
        output = np.asarray(written.dataobj)
        assert _labels_of(out) and _labels_of(out) <= _labels_of(root / f"label_{support_case}.nii.gz")
        meta = json.loads(sidecar.read_text())
        assert set(meta["timings"]) >= {"total", "retrieve", "postprocess"}
        for name, info in meta["provenance"].items():
            value = meta["labels"][name]
            axis = info["slice_axis"]
            for z, entry in info["slices"].items():
                # Provenance names real support slices of the one labelled image, with the label.
                assert all(s["image_id"] == f"s{support_case}" and s["axis"] == 2 for s in entry["supports"])
                # A label runs where a chosen support holds it, or where the slice before it in the
                # propagation predicted it present (SAM 2's object score decides, as in its tracker).
                assert any(s["has_label"] for s in entry["supports"]) or entry["via"] == "neighbour"
            # File slice numbers: the label is exactly absent from the slices provenance does not list.
            for z in range(output.shape[axis]):
                if str(z) not in info["slices"]:
                    assert not (np.take(output, z, axis=axis) == value).any(), (name, z)


def test_bank_entries_name_file_slices_and_keep_negatives(engine_factory, cmr):
    """Entries of an LSP volume record the file's slice numbers; label-free slices are stored as negatives."""
    engine, _ = engine_factory()
    engine.ingest("a", cmr / "image_10.nii.gz", cmr / "label_10.nii.gz")
    label = np.asarray(nib.load(str(cmr / "label_10.nii.gz")).dataobj)
    on_disk = {z: {int(v) for v in np.unique(label[..., z]) if v} for z in range(label.shape[2])}
    entries = [engine.bank.support(("a", i)) for i in range(engine.bank.record("a")["entries"])]
    originals = [e for e in entries if not e.ref.augmentation]
    assert {e.ref.slice_index for e in originals if e.labels} == {z for z, v in on_disk.items() if v}
    for e in originals:
        assert set(e.labels) == on_disk[e.ref.slice_index]
    negatives = [e for e in originals if not e.labels]
    assert len(negatives) == 4 == engine.bank.stats()["negative_slices"]  # random-tiny keeps 4 per image
    assert engine.bank.record("a")["source"]["slice_axis"] == 2


def test_wide_field_of_view_volume(engine_factory, chaos, tmp_path):
    """A 0.8 mm, 410 mm-wide resampling of a shared volume (canvas: 128 px x 2.5 mm = 320 mm), its anatomy
    pushed against one edge: it keeps the bank's 2.5 mm (one physical scale per bank), the canvas is
    cropped around the body, labels survive ingestion and the output keeps the input's geometry."""
    import torch

    img, lab = nib.load(str(chaos / "image_2.nii.gz")), nib.load(str(chaos / "label_2.nii.gz"))
    zoom = 1.25 / 0.8
    def resample(data, mode):
        t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(data.astype(np.float32), 2, 0)))[:, None]
        t = torch.nn.functional.interpolate(t, size=(400, 400), mode=mode)[:, 0].numpy()
        return np.pad(np.moveaxis(t, 0, 2), ((112, 0), (56, 56), (0, 0)))
    affine = img.affine @ np.diag([1 / zoom, 1 / zoom, 1, 1])
    affine[:3, 3] -= affine[:3, :3] @ np.array([112, 56, 0])
    image = resample(np.asarray(img.dataobj), "bilinear")
    label = resample(np.asarray(lab.dataobj), "nearest").round().astype(np.uint8)
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "wide.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "wide_label.nii.gz"))
    engine, _ = engine_factory()
    engine.ingest("wide", tmp_path / "wide.nii.gz", tmp_path / "wide_label.nii.gz")
    geometry = engine.prepare(tmp_path / "wide.nii.gz").geometry
    spacing = geometry.pixel_spacing_mm  # in-plane mm per canvas pixel
    canvas_mm2, file_mm2 = {}, {}
    for i in range(engine.bank.record("wide")["entries"]):
        entry = engine.bank.support(("wide", i))
        if not entry.ref.augmentation:
            for v in np.unique(label[..., entry.ref.slice_index]):
                if v:
                    file_mm2[int(v)] = file_mm2.get(int(v), 0) + (label[..., entry.ref.slice_index] == v).sum() * 0.8**2
                    canvas_mm2[int(v)] = canvas_mm2.get(int(v), 0) + (entry.mask == v).sum() * spacing**2
    # Every organ keeps its area on the canvas, at the bank's own spacing (the 320 mm of anatomy fit
    # the 320 mm canvas; only the empty 90 mm beside it are cropped).
    assert spacing == pytest.approx(2.5) and min(geometry.offset) < 0
    assert set(canvas_mm2) == set(file_mm2) == {1, 2, 3, 4}
    for v in file_mm2:
        assert canvas_mm2[v] == pytest.approx(file_mm2[v], rel=0.1), v
    seg = engine.segment(tmp_path / "wide.nii.gz")
    seg.save(tmp_path / "out.nii.gz")
    written = nib.load(str(tmp_path / "out.nii.gz"))
    assert written.shape == image.shape == (512, 512, img.shape[2])
    np.testing.assert_array_equal(written.affine, nib.load(str(tmp_path / "wide.nii.gz")).affine)


def test_bank_persists_and_reloads_identically(engine_factory, chaos, tmp_path):
    engine, _ = engine_factory(tmp_path / "bank")
    engine.ingest("a", chaos / "image_1.nii.gz", chaos / "label_1.nii.gz")
    engine.ingest("b", chaos / "image_2.nii.gz", chaos / "label_2.nii.gz")
    query = engine.embed_volume(chaos / "image_3.nii.gz")
    scores, rows = engine.bank.search(query, 8)
    again, report = engine_factory(tmp_path / "bank")
    assert sorted(report.loaded) == ["a", "b"]
    scores2, rows2 = again.bank.search(query, 8)
    assert rows == rows2
    np.testing.assert_allclose(scores, scores2, rtol=1e-5)


def test_truncated_bank_file_is_detected_and_rebuilt(engine_factory, chaos, tmp_path):
    store = make_datastore(tmp_path / "store", chaos, ["1", "2"], ["3"])
    sources = labelled(scan_datastore(store))
    engine, _ = engine_factory(tmp_path / "bank")
    engine.reconcile(sources)
    before = engine.bank.stats()
    shard = tmp_path / "bank" / "shards" / engine.bank.record("image_1")["shard"]
    victim = max(shard.glob("*.npy"), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 100)
    engine2, report = engine_factory(tmp_path / "bank")
    assert "image_1" in report.dropped
    result = engine2.reconcile(sources)
    assert result["ingested"] == ["image_1"] and result["kept"] == ["image_2"]
    after = engine2.bank.stats()
    assert (after["images"], after["slices"], after["per_label"]) == (before["images"], before["slices"], before["per_label"])


def test_replacing_a_label_replaces_its_slices(engine_factory, chaos, tmp_path):
    engine, _ = engine_factory(tmp_path / "bank")
    engine.ingest("a", chaos / "image_1.nii.gz", chaos / "label_1.nii.gz")
    first = engine.bank.stats()
    engine.ingest("a", chaos / "image_1.nii.gz", chaos / "label_1.nii.gz")
    assert engine.bank.stats()["slices"] == first["slices"]
    # A label with only the liver kept: fewer labelled slices, no trace of the old ones.
    img = nib.load(str(chaos / "label_1.nii.gz"))
    liver = np.where(np.asarray(img.dataobj) == 1, 1, 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(liver, img.affine, img.header), str(tmp_path / "liver.nii.gz"))
    engine.ingest("a", chaos / "image_1.nii.gz", tmp_path / "liver.nii.gz")
    stats = engine.bank.stats()
    assert stats["images"] == 1 and set(stats["per_label"]) == {"1"}
    assert stats["per_label"]["1"] == first["per_label"]["1"]


def test_support_masks_condition_the_output(engine_factory, chaos, tmp_path):
    """Same images, different support masks -> different output: the memories really condition SAM 2."""
    img = nib.load(str(chaos / "label_1.nii.gz"))
    label = np.asarray(img.dataobj).astype(np.uint8)
    shifted = np.roll(label, 40, axis=0)  # same organs, elsewhere
    nib.save(nib.Nifti1Image(shifted, img.affine, img.header), str(tmp_path / "shifted.nii.gz"))
    outputs = []
    for lab in (chaos / "label_1.nii.gz", chaos / "label_1.nii.gz", tmp_path / "shifted.nii.gz"):
        engine, _ = engine_factory()
        engine.ingest("a", chaos / "image_1.nii.gz", lab)
        result = engine.transfer.segment_volume(
            *_plans_for(engine, chaos / "image_2.nii.gz"), cache_key=None
        )
        outputs.append(np.stack([s.probabilities for s in result.slices]))
    np.testing.assert_array_equal(outputs[0], outputs[1])  # deterministic: any change comes from the masks
    # Random tiny weights are barely sensitive, so the change is small, but it is far above float
    # noise (identical inputs above differ by exactly 0).
    assert np.abs(outputs[0] - outputs[2]).max() > 1e-5


def _plans_for(engine, path):
    prepared, embeddings = engine._prepared_with_embeddings(path)
    labels = engine.bank.label_values
    plans, _ = engine.plan(prepared, embeddings, labels)
    return prepared.canvas, plans, labels


def test_supports_come_from_distinct_slices(engine_factory, chaos, tiny_settings):
    """A labelled slice and its augmented copies are near neighbours in the index: without the
    distinct-sources rule they fill the kept memories with one example seen several ways."""
    from fewshot.config import deep_merge

    def sources_per_slice(distinct: bool) -> list[list[tuple]]:
        settings = deep_merge(tiny_settings, {"selection": {"distinct_sources": distinct}})
        engine, _ = engine_factory(settings=settings)
        engine.ingest("a", chaos / "image_1.nii.gz", chaos / "label_1.nii.gz")
        prepared = engine.prepare(chaos / "image_2.nii.gz")
        plans, _ = engine.plan(prepared, engine.embedder.embed(prepared.canvas), [1, 2, 3, 4])
        return [[(s.ref.image_id, s.ref.slice_index) for s in p.supports] for p in plans]

    distinct = sources_per_slice(True)
    assert all(len(set(s)) == len(s) == tiny_settings["selection"]["keep"] for s in distinct)
    assert any(len(set(s)) < len(s) for s in sources_per_slice(False))  # the rule has something to do


def test_bank_reports_the_bytes_of_each_entrys_cached_memories(engine_factory, chaos):
    """What a bank of 1e5 slices will need on disk: the SAM 2 memories are most of an entry."""
    engine, _ = engine_factory()
    engine.ingest("a", chaos / "image_1.nii.gz", chaos / "label_1.nii.gz")
    entry = engine.bank.support(("a", 0))
    expected = sum(np.asarray(a).nbytes for a in entry.payload.values())
    assert engine.bank.stats()["payload_bytes_per_entry"] == expected > 0
    assert entry.payload["maskmem_features"].dtype == np.float16  # half precision on disk


def test_cached_memories_never_reencode_supports(engine_factory, chaos, tiny_settings):
    """k=16 supports per slice: the image encoder runs once per query slice and never on a support."""
    from fewshot.config import deep_merge

    settings = deep_merge(tiny_settings, {"selection": {"keep": 16, "distinct_sources": False}, "retrieval": {"top_k": 16},
                                          "matcher": {"type": "none"}})
    engine, _ = engine_factory(settings=settings)
    engine.ingest("a", chaos / "image_1.nii.gz", chaos / "label_1.nii.gz")
    model = engine.transfer.model
    calls = []
    original = model.forward_image
    model.forward_image = lambda img: (calls.append(img.shape[0]), original(img))[1]
    try:
        seg = engine.segment(chaos / "image_2.nii.gz")
        n_slices = seg.timings["slices"]
        assert sum(calls) == n_slices
        assert max(len(v["supports"]) for info in seg.provenance.values() for v in info["slices"].values()) == 16
        calls.clear()
        again = engine.segment(chaos / "image_2.nii.gz")  # same image, same bank: the result is reused
        assert sum(calls) == 0 and again.timings.get("reused") is True
        np.testing.assert_array_equal(again.label, seg.label)
        engine.ingest("b", chaos / "image_3.nii.gz", chaos / "label_3.nii.gz")  # a save changes the bank
        calls.clear()
        changed = engine.segment(chaos / "image_2.nii.gz")
        assert "reused" not in changed.timings  # recomputed against the new bank ...
        assert sum(calls) == 0  # ... with the cached image features of the query
    finally:
        model.forward_image = original


def test_bad_input_leaves_the_bank_unchanged(engine_factory, chaos, tmp_path):
    engine, _ = engine_factory(tmp_path / "bank")
    engine.ingest("a", chaos / "image_1.nii.gz", chaos / "label_1.nii.gz")
    manifest = (tmp_path / "bank" / "manifest.json").read_bytes()
    stats = engine.bank.stats()
    img = nib.load(str(chaos / "image_2.nii.gz"))
    lab = np.asarray(nib.load(str(chaos / "label_2.nii.gz")).dataobj)
    bad = {}
    (tmp_path / "garbage.nii.gz").write_bytes(b"\x00\x01garbage")
    bad["corrupt"] = (chaos / "image_2.nii.gz", tmp_path / "garbage.nii.gz", "not a readable medical image")
    nib.save(nib.Nifti1Image(lab[:, :100], img.affine), str(tmp_path / "small.nii.gz"))
    bad["shape"] = (chaos / "image_2.nii.gz", tmp_path / "small.nii.gz", "does not match image shape")
    nib.save(nib.Nifti1Image(lab.astype(np.float32) * 0.5, img.affine), str(tmp_path / "frac.nii.gz"))
    bad["fractional"] = (chaos / "image_2.nii.gz", tmp_path / "frac.nii.gz", "integers")
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.float32), np.eye(4)), str(tmp_path / "flat.nii.gz"))
    bad["2d"] = (tmp_path / "flat.nii.gz", tmp_path / "flat.nii.gz", "expected a 3D image")
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 1), np.float32), np.eye(4)), str(tmp_path / "one.nii.gz"))
    bad["2d_as_3d"] = (tmp_path / "one.nii.gz", tmp_path / "one.nii.gz", "got a 2D image")
    bad["missing"] = (tmp_path / "absent.nii.gz", chaos / "label_2.nii.gz", "no such file")
    (tmp_path / "notes.txt").write_text("not an image")
    bad["text"] = (tmp_path / "notes.txt", chaos / "label_2.nii.gz", "not a readable medical image")
    for name, (image, label, message) in bad.items():
        with pytest.raises(VolumeError, match=message):
            engine.ingest(f"bad-{name}", image, label)
    with pytest.raises(VolumeError, match="not among the configured labels"):
        engine.ingest("bad-values", chaos / "image_2.nii.gz", chaos / "label_2.nii.gz", allowed_labels=[1])
    assert (tmp_path / "bank" / "manifest.json").read_bytes() == manifest
    assert engine.bank.stats() == stats


def test_empty_bank_segments_nothing_and_says_why(engine_factory, chaos):
    engine, _ = engine_factory()
    engine.label_names = {"liver": 1}
    seg = engine.segment(chaos / "image_2.nii.gz")
    assert seg.label.shape == nib.load(str(chaos / "image_2.nii.gz")).shape and not seg.label.any()
    assert "no labelled example" in seg.skipped["liver"]


def test_cli_segment_and_bank_stats(chaos, tmp_path, models_dir, capsys):
    store = make_datastore(tmp_path / "store", chaos, ["1"], ["2"])
    env = dict(os.environ, FEWSHOT_MODELS_DIR=str(models_dir), OMP_NUM_THREADS="1")
    # No augmented copies (the engine tests cover them): this process then never imports MONAI's
    # augmentation transforms, 10-20 s of CPU. The same --set for stats: it is in the bank's fingerprint.
    no_augmentation = ["--set", "bank.augmentations_per_slice=0"]
    out = tmp_path / "out" / "seg.nii.gz"
    # `python -m fewshot segment` as a user types it, in its own process: the end-to-end path.
    run = subprocess.run(
        [sys.executable, "-m", "fewshot", "segment", "--image", str(store / "image_2.nii.gz"),
         "--support", str(store), "--output", str(out), "--preset", "random-tiny", *no_augmentation,
         "--labels", "liver=1,right_kidney=2,left_kidney=3,spleen=4"],
        capture_output=True, text=True, env=env, cwd=PROJECT, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["seconds_per_volume"] > 0
    assert nib.load(str(out)).shape == nib.load(str(store / "image_2.nii.gz")).shape
    sidecar = json.loads(out.with_name("seg.json").read_text())
    assert set(sidecar["labels"]) == {"liver", "right_kidney", "left_kidney", "spleen"}
    assert "RANDOM WEIGHTS" in run.stderr  # the test preset says loudly that its output is meaningless
    # The other two commands through the same entry point (cli.main) in this process: a subprocess
    # each would only re-import torch (about 5 s of CPU each) to run the same code.
    from fewshot.cli import main

    os.environ["FEWSHOT_MODELS_DIR"] = str(models_dir)  # as the session fixture set it; the subprocess had it too
    capsys.readouterr()
    assert main(["bank", "stats", "--datastore", str(store), "--preset", "random-tiny", *no_augmentation]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["images"] == 1 and data["slices"] > 0 and data["labels"] == [1, 2, 3, 4]
    assert "needs_rebuild" not in data  # the bank segment built, with the same settings
    bad = main(["segment", "--image", str(tmp_path / "missing.nii.gz"), "--support", str(store), "--output", str(out),
                "--preset", "random-tiny"])
    assert bad == 2 and "no such file" in capsys.readouterr().err


def _synthetic_case(directory, name, slices=range(2, 6), value=1, shape=(48, 48, 8), seed=0):
    """A small labelled volume (2.5 mm in plane, like the random-tiny canvas): a bright square of
    ``value`` on ``slices``, nothing elsewhere. Returns (image path, label path)."""
    rng = np.random.default_rng(seed)
    image = rng.random(shape).astype(np.float32) * 50
    label = np.zeros(shape, np.uint8)
    for z in slices:
        image[12:30, 14:34, z] += 100
        label[12:30, 14:34, z] = value
    affine = np.diag([2.5, 2.5, 6.0, 1.0])
    paths = directory / f"{name}.nii.gz", directory / f"{name}_label.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), str(paths[0]))
    nib.save(nib.Nifti1Image(label, affine), str(paths[1]))
    return paths


def test_plan_reranks_by_matcher_and_keeps_k():
    """top_k candidates ranked on ids and images; payloads read for the k kept only."""
    from fewshot.bank import SupportBank
    from fewshot.bank_shards import SliceBatch
    from fewshot.config import deep_merge, load_preset
    from fewshot.segmentation import PreparedVolume

    rng = np.random.default_rng(0)
    n, size = 12, 8
    masks = np.zeros((n, size, size), np.uint16)
    masks[::2, 2:5, 2:5] = 1  # even entries hold label 1, odd ones are negatives
    emb = rng.normal(size=(n, 6)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    images = np.stack([np.full((size, size), i / n, np.float32) for i in range(n)])  # brightness = entry number
    bank = SupportBank(None, "fp")
    bank.put("a", SliceBatch(images=images, masks=masks, embeddings=emb, slice_index=np.arange(n),
                             augmentation=[""] * n, payload={"memory": np.zeros((n, 1, 3), np.float32)}, payload_labels=(1,)))

    class Brightest:  # a matcher that prefers bright candidates: a ranking retrieval would never give
        name = "brightest"

        def distances(self, query, candidates):
            return -candidates.mean(axis=(1, 2))

    loads = []
    original = bank.support
    bank.support = lambda row, score=0.0, labels=None: (loads.append(row), original(row, score, labels))[1]
    settings = deep_merge(load_preset("random-tiny"), {"retrieval": {"top_k": 6}, "selection": {"keep": 2}})
    prepared = PreparedVolume(volume=None, canvas=np.zeros((3, size, size), np.float32), geometry=None, key="q")
    queries = emb[[0, 5, 9]]
    _, retrieved = bank.search(queries, 6)
    for matcher in (Brightest(), None):
        loads.clear()
        plans, _ = Engine(settings, None, matcher, None, bank).plan(prepared, queries, [1])
        assert len(loads) == 3 * 2  # k payloads per slice, not top_k
        for plan, rows in zip(plans, retrieved):
            kept = [s.ref.slice_index for s in plan.supports]
            expected = sorted((r[1] for r in rows), reverse=True)[:2] if matcher else [r[1] for r in rows[:2]]
            assert kept == expected
            assert plan.labels == ((1,) if any(i % 2 == 0 for i in kept) else ())
            assert all((s.match_distance is not None) == (matcher is not None) for s in plan.supports)


def test_per_call_options_equal_an_engine_with_those_settings_and_share_its_caches(engine_factory, tiny_settings, tmp_path):
    """A request's top_k/keep/matching as SegmentOptions: the same label and supports as an engine built
    with those settings (what the app did per request), while the engine keeps one set of caches."""
    from fewshot.config import deep_merge
    from fewshot.segmentation import SegmentOptions

    image, label = _synthetic_case(tmp_path, "case", slices=range(1, 7))
    engine, _ = engine_factory()
    _force_presence(engine)
    engine.ingest("a", image, label)
    options = SegmentOptions(top_k=2, keep=1, matching=False)
    other = Engine(deep_merge(tiny_settings, {"retrieval": {"top_k": 2}, "selection": {"keep": 1}}), engine.embedder,
                   None, engine.transfer, engine.bank, engine.label_names)
    expected = other.segment(image)
    default = engine.segment(image)
    got = engine.segment(image, options=options)
    assert not got.timings.get("reused")  # other settings: not the default call's result
    np.testing.assert_array_equal(got.label, expected.label)
    assert got.provenance == expected.provenance
    supports = {len(e["supports"]) for info in got.provenance.values() for e in info["slices"].values()}
    assert supports == {1} and default.provenance != got.provenance
    assert engine.segment(image, options=options).timings.get("reused")  # its own result is kept
    assert engine.segment(image).timings.get("reused")  # and the default one too
    engine.forget_caches()
    assert not engine.segment(image).timings.get("reused")


def test_mask_threshold_reaches_the_output(engine_factory, tmp_path):
    image, label = _synthetic_case(tmp_path, "case")
    engine, _ = engine_factory()
    _force_presence(engine)
    engine.ingest("a", image, label)
    counts = {}
    for logit in (-30.0, 0.0, 30.0):
        engine.transfer.mask_threshold = logit
        seg = engine.segment(image)
        counts[logit] = int((seg.label > 0).sum())
        presence = {e["present"] for info in seg.provenance.values() for e in info["slices"].values()}
        if logit:  # provenance's "present" follows the same threshold
            assert presence == {logit < 0}
    assert counts[-30.0] > counts[0.0] > counts[30.0] == 0


def test_stale_images_follow_image_content_and_present_labels(engine_factory, tmp_path):
    image, label = _synthetic_case(tmp_path, "a")
    other_image, other_label = _synthetic_case(tmp_path, "b", value=2, seed=1)
    engine, _ = engine_factory(tmp_path / "bank")
    sources = {"a": (str(image), str(label))}
    assert engine.reconcile(sources)["ingested"] == ["a"]
    # A configured label with no example anywhere does not make the bank stale.
    engine.label_names = {"organ": 1, "gallbladder": 9}
    assert engine.stale_images(sources) == {}
    # Touched but unchanged: not stale. Other voxels under the same name: stale.
    os.utime(image, ns=(1, 1))
    assert engine.stale_images(sources) == {}
    data = nib.load(str(image))
    nib.save(nib.Nifti1Image(np.asarray(data.dataobj) * 2, data.affine), str(image))
    assert engine.stale_images(sources) == {"a": "image changed since it was ingested"}
    # Reconcile: a label value new to the bank (2, from "b") makes "a" need its memories, in the same pass;
    # an image whose ingestion fails in any way never stops the others.
    sources = {"a": (str(image), str(label)), "b": (str(other_image), str(other_label)), "c": (str(image), str(label))}
    ingest = engine.ingest

    def flaky(image_id, *args, **kwargs):
        if image_id == "c":
            raise RuntimeError("encoder blew up")
        return ingest(image_id, *args, **kwargs)

    engine.ingest = flaky
    result = engine.reconcile(sources)
    assert result["ingested"] == ["a", "b"] and result["failed"] == {"c": "encoder blew up"}
    assert engine.bank.label_values == [1, 2] and set(engine.stale_images(sources)) == {"c"}


def test_cli_bank_stats_never_touches_the_bank(engine_factory, tiny_settings, tmp_path, capsys):
    """`bank stats` with other settings reports the mismatch; a later `bank build` would rebuild."""
    from fewshot.cli import main
    from fewshot.folders import bank_dir_for

    store = tmp_path / "store"
    (store / "labels" / "final").mkdir(parents=True)
    _synthetic_case(tmp_path, "case")
    shutil.copy(tmp_path / "case.nii.gz", store / "image_1.nii.gz")
    shutil.copy(tmp_path / "case_label.nii.gz", store / "labels" / "final" / "image_1.nii.gz")
    bank_dir = bank_dir_for(store, "random-tiny")
    engine, _ = engine_factory(bank_dir)
    engine.reconcile(labelled(scan_datastore(store)))
    manifest = (bank_dir / "manifest.json").read_bytes()
    shards = sorted(p.name for p in (bank_dir / "shards").iterdir())
    capsys.readouterr()
    assert main(["bank", "stats", "--datastore", str(store), "--preset", "random-tiny", "--set", "volume.canvas=64"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert "built by" in stats["needs_rebuild"]["discarded_all"] and stats["images"] == 0
    assert (bank_dir / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in (bank_dir / "shards").iterdir()) == shards
    assert main(["bank", "stats", "--datastore", str(store), "--preset", "random-tiny"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 1


TINY_MODELS = {
    "random_weights": True, "volume.canvas": 128, "volume.pixel_spacing_mm": 2.5,
    "embedder.model": "dinov2-random-tiny", "embedder.input_size": 56, "matcher.size": 64,
    "transfer.model": "sam2-random-tiny", "transfer.image_size": 128,
}


@pytest.mark.parametrize("preset", ["rag-sam2", "lpips-sam2"])
def test_each_papers_preset_runs_its_own_path(preset, chaos, models_dir):
    """rag-sam2: the 16 retrieved slices, unranked, all memories. lpips-sam2: LPIPS over every entry
    of a one-scan augmented bank, the single best as the conditioning frame, SAM 2's video settings.
    The real presets with the tiny random networks swapped in (the presets' own paths, not quality)."""
    from fewshot.config import load_preset

    overrides = dict(TINY_MODELS)
    if preset == "lpips-sam2":
        overrides["bank.augmentations_per_slice"] = 2  # the preset's 10 copies, fewer for the test's time
    settings = load_preset(preset, overrides)
    engine, _ = Engine.from_settings(settings)
    engine.ingest("a", chaos / "image_1.nii.gz", chaos / "label_1.nii.gz")
    entries = engine.bank.stats()["slices"]
    prepared = engine.prepare(chaos / "image_2.nii.gz")
    compared = []
    if engine.matcher is not None:
        original = engine.matcher.distances
        engine.matcher.distances = lambda q, c: (compared.append(len(c)), original(q, c))[1]
    plans, _ = engine.plan(prepared, engine.embedder.embed(prepared.canvas), [1, 2, 3, 4])
    if preset == "rag-sam2":
        assert engine.matcher is None and not compared
        assert engine.bank.stats()["augmented_slices"] == 0
        assert all(len(p.supports) == 16 for p in plans)
        assert all([s.score for s in p.supports] == sorted((s.score for s in p.supports), reverse=True) for p in plans)
    else:
        assert engine.transfer.neighbours == 6 and engine.transfer.pointers == 15 and engine.transfer.fill_hole_area == 8
        assert compared == [entries] * len(plans)  # LPIPS against every copy in the bank, for every slice
        assert all(len(p.supports) == 1 for p in plans)
    seg = engine.segment(chaos / "image_2.nii.gz")
    assert seg.label.shape == nib.load(str(chaos / "image_2.nii.gz")).shape


def test_unannotated_labels_are_flagged_in_the_cached_memories(engine_factory, tmp_path):
    """annotated_labels {1}: a slice without label 2 says nothing about 2, so its cached memories
    flag 2 as not annotated (SAM 2 then never reads an "absent" memory for it); where 2 is painted,
    and for a complete label, every label is flagged annotated."""
    from fewshot.annotation import Annotation

    engine, _ = engine_factory(tmp_path / "bank")
    image, label = _synthetic_case(tmp_path, "two", slices=range(1, 7), value=1)
    data = np.asarray(nib.load(str(label)).dataobj).copy()
    data[32:40, 32:40, 4:6] = 2  # label 2 painted on slices 4 and 5 only
    nib.save(nib.Nifti1Image(data, nib.load(str(label)).affine), str(label))
    engine.ingest("partial", image, label, annotation=Annotation(labels=(1,)))
    engine.ingest("complete", image, label)
    for image_id, complete in (("partial", False), ("complete", True)):
        entries = engine.bank.record(image_id)["entries"]
        for i in range(entries):
            support = engine.bank.support((image_id, i), labels=[1, 2])
            flags = support.payload["label_annotated"]
            assert flags[0], (image_id, i)  # label 1 was annotated everywhere
            assert flags[1] == (complete or 2 in support.labels), (image_id, i, support.labels)
        if not complete:
            assert any(2 not in engine.bank.support((image_id, i), labels=[1, 2]).labels for i in range(entries))


def test_after_a_new_label_only_affected_slices_rerun_and_the_result_equals_a_fresh_engines(engine_factory, tmp_path):
    """A second inference after a save changed the bank: the SAM 2 propagation re-runs the slices whose
    supports changed and those that read them, and gives what a new engine on the same bank gives."""
    bank_dir = tmp_path / "bank"
    engine, _ = engine_factory(bank_dir)
    _force_presence(engine)
    a = _synthetic_case(tmp_path, "a", slices=range(1, 7), seed=1)
    b = _synthetic_case(tmp_path, "b", slices=range(3, 5), seed=2)
    query, _ = _synthetic_case(tmp_path, "q", slices=range(1, 7), seed=3)
    engine.ingest("a", *a)
    first = engine.segment(query)
    assert first.computed_slices == first.timings["slices"]
    engine.ingest("b", *b)
    again = engine.segment(query)
    fresh_engine, _ = engine_factory(bank_dir)
    _force_presence(fresh_engine)
    fresh = fresh_engine.segment(query)
    np.testing.assert_array_equal(again.label, fresh.label)
    assert again.provenance == fresh.provenance
    assert fresh.computed_slices == fresh.timings["slices"]
    assert again.computed_slices <= again.timings["slices"]


def test_the_cli_sync_puts_only_the_annotated_part_of_a_partial_save_in_the_bank(engine_factory, tmp_path):
    """A bank the CLI builds from an app's datastore (`python -m fewshot bank sync`, `segment --support`)
    reads which final labels the app saved as partial from MONAI Label's index, as the app does: only
    the annotated slices enter (the others are not "no organ"). When the index later says the label
    is complete, the entry is stale and is made again whole; an index that cannot be read stops the
    sync with a clear error rather than guessing "complete"."""
    from fewshot.annotation import Annotation, AnnotationError
    from fewshot.cli.common import sync_bank
    from fewshot.folders import INDEX_FILE

    store = tmp_path / "store"
    (store / "labels" / "final").mkdir(parents=True)
    image, label = _synthetic_case(tmp_path, "scan", slices=range(1, 7))
    shutil.copy(image, store / "scan.nii.gz")
    shutil.copy(label, store / "labels" / "final" / "scan.nii.gz")

    def index(annotation):
        info = {"annotation": annotation} if annotation else {}
        (store / INDEX_FILE).write_text(json.dumps({"name": "s", "description": "", "objects": {
            "scan": {"image": {"ext": ".nii.gz", "info": {}}, "labels": {"final": {"ext": ".nii.gz", "info": info}}}}}))

    engine, _ = engine_factory(tmp_path / "bank")
    index({"partial": True, "slices": [2, 3], "axis": 2, "labels": None, "how": "params annotated_slices"})
    assert sync_bank(engine, str(store))["ingested"] == ["scan"]
    record = engine.bank.record("scan")
    assert record["source"]["annotation"]["slices"] == [2, 3]
    stats = engine.bank.stats()
    # The two annotated slices (plus their augmented copies); the unannotated 0 and 7 are no negatives.
    assert stats["per_label"] == {"1": 2} and stats["negative_slices"] == 0
    assert sync_bank(engine, str(store))["ingested"] == []  # in step: nothing redone

    index(None)  # the label was saved again, whole
    assert engine.stale_images({"scan": (str(store / "scan.nii.gz"), str(store / "labels" / "final" / "scan.nii.gz"))},
                               lambda image_id: Annotation()) == {"scan": "annotated part of its label changed since it was ingested"}
    assert sync_bank(engine, str(store))["ingested"] == ["scan"]
    stats = engine.bank.stats()
    assert stats["per_label"] == {"1": 6} and stats["negative_slices"] == 2  # whole: slices 1-6, and 0 and 7 empty
    assert not engine.bank.record("scan")["source"].get("annotation")

    (store / INDEX_FILE).write_text('{"objects": {"scan": ')  # torn
    with pytest.raises(AnnotationError, match="cannot read which final labels are partial"):
        sync_bank(engine, str(store))
