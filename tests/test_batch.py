"""``python -m fewshot batch`` on a real local Ray (2 workers, 2 CPUs) over the real hippocampus scans,
with the random-tiny preset: outputs equal the engine's own, the manifest, resuming after a stop,
a corrupt input, the bank left untouched and pinned to one generation. Ray starts once per module,
and its runs share one WorkerPool: workers start once (most of a run's time otherwise) and each run
loads its batch into them; the app's batch, which keeps no pool, starts and stops its own worker; the
timeout test, last, sees its worker killed and replaced.
Skipped with a message only where Ray cannot start (or ../shared/data is absent)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import make_datastore, shared_dataset
from fewshot.bank import SupportBank, manifest_snapshot
from fewshot.batch import inputs
from fewshot.batch.manifest import MANIFEST_NAME, Manifest
from fewshot.batch.pool import WorkerPool
from fewshot.batch.runner import BatchSpec, RayOptions, run_batch
from fewshot.batch.worker import batch_settings
from fewshot.folders import bank_dir_for
from fewshot.folders import labelled, scan_datastore
from fewshot.engine import Engine

LABELLED = ["015", "184"]
QUERIES = ["195"]
# --case-timeout of the timeout test (seconds), which the stuck case waits out. A case here takes about
# 1.5 s on an idle core; 8 s timed out the healthy case once on 2 cores shared with a registration-heavy
# eval, so 10x margin (the healthy case runs on an idle worker of the pool: no start-up inside it).
TIMEOUT = 15.0
# The runner is what these tests are about: the bank holds no augmented copies (tested in test_bank),
# which would triple the module's ingestion and be mapped and searched the same way.
OVERRIDES = {"selection.keep": 2, "retrieval.top_k": 4, "bank.augmentations_per_slice": 0}


@pytest.fixture(scope="module")
def ray_local(models_dir):
    """One local Ray for the module (its workers inherit FEWSHOT_MODELS_DIR from models_dir)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
    # Ray kills its workers when the whole machine is 95 % full, whoever filled it (it happened here
    # while other jobs ran): that is not what these tests are about.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    try:
        import ray

        # One logical CPU more than the pool's two workers hold while idle: a run with its own workers
        # (the app's) gets one. The machine has 2 cores; the pool's idle workers use none.
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, object_store_memory=128 << 20)
    except Exception as exc:  # noqa: BLE001 - any reason Ray cannot start here is a skip, with the reason
        pytest.skip(f"Ray cannot start on this machine: {type(exc).__name__}: {exc}")
    yield ray
    ray.shutdown()


def _settings(tiny_settings) -> dict:
    return batch_settings(tiny_settings, threads=1, overrides=OVERRIDES)


@pytest.fixture(scope="module")
def pool(ray_local, tiny_settings, models_dir):
    """Workers kept between the module's runs (as a long-lived driver keeps them), started before
    the bank is built so that they load the preset while the driver builds it."""
    with WorkerPool(RayOptions()) as workers:
        workers.start(2, _settings(tiny_settings), str(models_dir))
        yield workers


def _tree_sha256(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_settings, models_dir):
    """A datastore with two labelled scans and its bank, and as unlabelled images another scan, one
    re-oriented (flipped axis and affine) and a truncated copy: the batch's input is the datastore's
    folder (its labelled scans included), its output where the app's /batch/infer keeps it."""
    hippo = shared_dataset("msd-hippocampus")
    root = tmp_path_factory.mktemp("batch")
    store = make_datastore(root / "store", hippo, LABELLED, QUERIES)
    settings = _settings(tiny_settings)
    bank_dir = bank_dir_for(store, "random-tiny")
    engine, _ = Engine.from_settings(settings, bank_dir=bank_dir, models_dir=models_dir)
    assert not engine.reconcile(labelled(scan_datastore(store)))["failed"]
    del engine
    folder = store
    img = nib.load(str(hippo / "image_216.nii.gz"))
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = img.shape[0] - 1
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine @ flip), str(folder / "flipped.nii.gz"))
    raw = (hippo / "image_199.nii.gz").read_bytes()
    (folder / "corrupt.nii.gz").write_bytes(raw[: len(raw) // 2])  # a copy cut short: header fine, voxels missing
    return {"store": store, "bank_dir": bank_dir, "folder": folder, "settings": settings, "root": root,
            "output": store / ".fewshot" / "batch-random-tiny"}


LABEL_NAMES = {"anterior": 1, "posterior": 2}


@pytest.fixture(scope="module")
def reference(setup, models_dir) -> Engine:
    """Engine.segment in the driver, on the module's bank: what every batch output must equal."""
    engine, _ = Engine.from_settings(setup["settings"], bank_dir=setup["bank_dir"], models_dir=models_dir,
                                     read_only=True, label_names=LABEL_NAMES)
    return engine


def _spec(setup, output: Path, models_dir, **kw) -> BatchSpec:
    return BatchSpec(settings=setup["settings"], bank_dir=str(setup["bank_dir"]), output_dir=str(output),
                     models_dir=str(models_dir), label_names=LABEL_NAMES, **kw)


def _stopped(pid: int, within: float = 10.0) -> bool:
    import time

    import psutil

    deadline = time.time() + within
    while time.time() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def _records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / MANIFEST_NAME).read_text().splitlines()]


def test_batch_stopped_resumed_and_skipped(ray_local, pool, setup, reference, models_dir):
    """A run stopped (Ctrl-C) after two cases, with a torn line left behind, then run again: only the
    unfinished cases are segmented, every case ends with one record naming the pinned bank
    generation, the corrupt input is recorded and the rest finish, outputs have their input's geometry
    and equal Engine.segment's; a third run skips everything, and the bank is never written."""
    cases = inputs.collect(setup["folder"])
    ids = [c.case_id for c in cases]
    assert ids == ["corrupt", "flipped", "image_015", "image_184", "image_195"]
    bank_before = _tree_sha256(setup["bank_dir"])
    generation = manifest_snapshot(SupportBank.read_manifest(setup["bank_dir"]))
    output = setup["output"]
    spec = _spec(setup, output, models_dir)
    options = RayOptions(workers=2)

    seen = []

    def stop_after_two(record):
        seen.append(record["case"])
        if len(seen) == 2:
            raise KeyboardInterrupt  # what Ctrl-C raises in the driver

    first = run_batch(cases, spec, options, progress=False, on_record=stop_after_two, pool=pool)
    assert first.interrupted and first.done + first.failed == 2
    assert [r["case"] for r in _records(output) if r["kind"] == "case"] == seen
    with open(output / MANIFEST_NAME, "ab") as f:
        f.write(b'{"kind": "case", "case": "image_1')  # a crash in the middle of a line
    # What Engine.segment gives each input (computed here, while the pool replaces the worker the stop killed).
    expected = {c.case_id: reference.segment(c.path).label for c in cases if c.case_id != "corrupt"}

    second = run_batch(cases, spec, options, progress=False, pool=pool)
    assert not second.interrupted and not second.error
    assert second.skipped == 2 and second.reasons == {"new": 3}
    assert second.done + second.failed == 3 and set(second.failures) <= {"corrupt"}

    records = _records(output)
    finals = {}
    for r in records:
        if r["kind"] == "case":
            assert r["case"] not in finals, "a case was segmented twice"
            finals[r["case"]] = r
    assert sorted(finals) == ids
    assert finals["corrupt"]["status"] == "failed" and "corrupt.nii.gz" in finals["corrupt"]["error"]
    assert finals["corrupt"]["retry"] is False
    runs = [r for r in records if r["kind"] == "run"]
    assert {r["bank_generation"] for r in records} == {generation} == {first.bank_generation, second.bank_generation}
    assert [r["event"] for r in runs] == ["start", "end", "start", "end"] and runs[1]["interrupted"]
    assert {w["bank_generation"] for w in first.workers + second.workers} == {generation}
    assert len({w["worker"] for w in second.workers}) == 2

    for case in cases:
        record = finals[case.case_id]
        if case.case_id == "corrupt":
            continue
        assert record["status"] == "done", record
        assert set(record["timings"]) >= {"total", "prepare_and_embed"} and record["seconds"] > 0
        out = output / record["output"]
        assert out == output / f"{case.case_id}.nii.gz" and out.with_suffix("").with_suffix(".json").is_file()
        written, source = nib.load(str(out)), nib.load(case.path)
        assert written.shape == source.shape
        np.testing.assert_array_equal(written.affine, source.affine)
        assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(source.affine)
        np.testing.assert_array_equal(np.asarray(written.dataobj), expected[case.case_id])

    third = run_batch(cases, spec, options, progress=False, pool=pool)
    assert third.skipped == len(cases) and third.done == third.failed == 0 and not third.workers
    assert _tree_sha256(setup["bank_dir"]) == bank_before


def test_cli_list_file_same_ids_and_pinning_decisions(ray_local, setup, models_dir, tmp_path, capsys):
    """The CLI over a list file of the same volumes finds the finished output (same case ids, nothing
    to do); after the bank changes, finished cases are planned again by default and kept with
    --keep-older-bank; a pinned reader keeps its generation while the bank changes on disk."""
    from fewshot.cli import main

    output = setup["output"]
    if not (output / MANIFEST_NAME).is_file():
        pytest.skip("needs the output of test_batch_stopped_resumed_and_skipped")
    listing = tmp_path / "cases.txt"
    listing.write_text("# the same volumes, listed\n" + "\n".join(
        c.path for c in inputs.collect(setup["folder"])) + "\n")
    argv = ["batch", str(listing), "--support", str(setup["store"]), "--output", str(output),
            "--preset", "random-tiny", "--models-dir", str(models_dir), "--no-progress", "--labels", "anterior=1,posterior=2",
            *[a for key, value in OVERRIDES.items() for a in ("--set", f"{key}={value}")]]  # the first test's settings
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"] == 5 and summary["done"] == 0

    # The bank changes (a copy of it: the module's bank stays as it is): a third labelled scan.
    bank_copy = tmp_path / "bank"
    shutil.copytree(setup["bank_dir"], bank_copy)
    writer, _ = Engine.from_settings(setup["settings"], bank_dir=bank_copy, models_dir=models_dir)
    pinned, report = SupportBank.open(bank_copy, writer.bank.fingerprint, pinned=SupportBank.read_manifest(bank_copy),
                                      verify="size")
    assert sorted(report.loaded) == ["image_015", "image_184"] and pinned.num_entries
    before = pinned.search(writer.bank.embeddings()[:3], 4)[1]
    hippo = shared_dataset("msd-hippocampus")
    writer.ingest("image_199", hippo / "image_199.nii.gz", hippo / "label_199.nii.gz")
    assert writer.bank.snapshot != report.snapshot
    assert not pinned.refresh() and pinned.snapshot == report.snapshot and "image_199" not in pinned.image_ids()
    assert pinned.search(writer.bank.embeddings()[:3], 4)[1] == before and pinned.read_only
    fresh = SupportBank.open(bank_copy, writer.bank.fingerprint, read_only=True)[0]
    assert fresh.snapshot == writer.bank.snapshot and "image_199" in fresh.image_ids()

    cases = inputs.collect(setup["folder"])
    with Manifest(output) as m:
        again = m.plan(cases, writer.bank.snapshot, _spec(setup, output, models_dir).settings_key())
        kept = m.plan(cases, writer.bank.snapshot, _spec(setup, output, models_dir).settings_key(), keep_older_bank=True)
    assert again.counts() == {"bank changed": 4} and [c.case_id for c in again.skipped] == ["corrupt"]
    assert not kept.todo


def test_inputs_and_manifest_units(tmp_path):
    """List files (relative paths, comments), id collisions, an unreachable or malformed DICOMweb URL,
    a second writer refused, and changed inputs planned again."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for p in (a / "x.nii.gz", b / "x.nii.gz", a / "y.nrrd"):
        p.write_bytes(b"0")
    (tmp_path / "list.txt").write_text("# comment\n\na/x.nii.gz\nb/x.nii.gz\n")
    assert [c.case_id for c in inputs.collect(tmp_path / "list.txt")] == ["a/x", "b/x"]
    assert [c.case_id for c in inputs.collect(a)] == ["x", "y"]
    (a / "x.nrrd").write_bytes(b"1")
    (tmp_path / "clash.txt").write_text("a/x.nii.gz\na/x.nrrd\n")
    with pytest.raises(inputs.InputError, match="would both be written"):
        inputs.collect(tmp_path / "clash.txt")
    (a / "x.nrrd").unlink()
    with pytest.raises(inputs.InputError):
        inputs.collect(tmp_path / "missing.txt")
    from app_harness import free_port

    with pytest.raises(inputs.InputError, match="could not be searched: ConnectionError"):
        inputs.collect(f"http://127.0.0.1:{free_port()}/dicom-web")  # nothing listens there
    with pytest.raises(inputs.InputError, match="not a DICOM UID"):
        inputs.collect("http://127.0.0.1/dicom-web/studies/1.2.x")

    out = tmp_path / "out"
    case = inputs.Case("x", str(a / "x.nii.gz"))
    with Manifest(out) as m:
        with pytest.raises(Exception, match="another batch"):
            Manifest(out).open()
        (out / "x.nii.gz").write_bytes(b"label")
        m.append({"kind": "case", "case": "x", "input": case.path, "status": "done", "output": "x.nii.gz",
                  "input_stamp": inputs.input_stamp(case.path), "bank_generation": "g1", "settings": "s1"})
        assert not m.plan([case], "g1", "s1").todo
        assert m.plan([case], "g1", "s2").reasons == {"x": "other settings"}
    os.utime(a / "x.nii.gz", ns=(1, 1))
    (a / "x.nii.gz").write_bytes(b"changed")
    with Manifest(out) as m:
        assert m.plan([case], "g1", "s1").reasons == {"x": "input changed"}


def test_a_worker_loads_a_batch_and_keeps_its_engine_while_the_batch_is_the_same(setup, models_dir, tmp_path):
    """In-process: a worker as Ray restarts it after a crash (no batch) answers `unloaded` and writes
    nothing (the driver loads it and sends the case again); load() builds the engine on the pinned
    generation, keeps it for a spec that differs only in what it is not built from, rebuilds it otherwise."""
    import dataclasses

    from fewshot.batch.worker import SegmentWorker, WorkerSpec

    case = inputs.Case("image_195", str(setup["store"] / "image_195.nii.gz"))
    worker = SegmentWorker()
    assert worker.segment(case, str(tmp_path / "x.nii.gz"))["status"] == "unloaded"
    assert not list(tmp_path.iterdir())
    pinned = SupportBank.read_manifest(setup["bank_dir"])
    spec = WorkerSpec(settings=setup["settings"], bank_dir=str(setup["bank_dir"]), pinned=pinned,
                      models_dir=str(models_dir), label_names=LABEL_NAMES, monai_reader=False)
    info = worker.load(spec)
    assert info["bank_generation"] == manifest_snapshot(pinned) and not info["problem"] and info["entries"]
    engine = worker.engine
    assert worker.load(dataclasses.replace(spec, only=["anterior"]))["bank_generation"] == info["bank_generation"]
    assert worker.engine is engine
    worker.load(dataclasses.replace(spec, label_names={"front": 1, "back": 2}))
    assert worker.engine is not engine
    record = worker.segment(case, str(tmp_path / "x.nii.gz"))
    assert record["status"] == "done" and record["bank_generation"] == info["bank_generation"]


def test_monai_label_batch_infer_hands_its_images_to_the_runner(ray_local, pool, setup, reference, models_dir):
    """With -c ray_address, MONAI Label's batch infer (in its background process) gives its images to
    the runner, whose manifest lives where the batch test above wrote its output: images it already
    segmented against the same bank, with the same settings, are not segmented again; an image added
    to the datastore since is segmented by a worker the run starts and stops itself (the app keeps no
    pool), with Engine.segment's voxels; each label is saved to the datastore as `original`, and
    again when the request is repeated."""
    import sys
    from types import SimpleNamespace

    from app_harness import APP

    sys.path.insert(0, str(APP))  # the app's lib package, imported as MONAI Label imports it
    try:
        from monailabel.datastore.local import LocalDatastore
        from monailabel.interfaces.tasks.batch_infer import BatchInferTask

        from lib.app_config import AppConfig
        from lib.engine_host import InferOptions
        from lib.ray_batch import RayBatchInfer, batch_infer_task
    finally:
        sys.path.remove(str(APP))

    conf = {"preset": "random-tiny", "models_dir": str(models_dir), "ray_address": "local", "ray_workers": "1",
            **{key: str(value) for key, value in OVERRIDES.items() if key.startswith("bank.")}}
    app = SimpleNamespace(
        conf=conf, app_config=AppConfig.from_conf(conf, setup["store"]),
        host=SimpleNamespace(label_map=lambda: dict(LABEL_NAMES)),
        _infers={"fewshot": SimpleNamespace(options=lambda request: (InferOptions(OVERRIDES["retrieval.top_k"], True,
                                                                                   OVERRIDES["selection.keep"]), []))},
        check_infer_request=lambda model, request: None,
    )
    task = batch_infer_task(app)
    assert isinstance(task, RayBatchInfer) and task.options.address is None and task.options.workers == 1
    assert type(batch_infer_task(SimpleNamespace(conf={}))) is BatchInferTask  # no ray_address: MONAI Label's own

    added = setup["store"] / "image_199.nii.gz"  # saved to the datastore after the batch above
    shutil.copy(shared_dataset("msd-hippocampus") / "image_199.nii.gz", added)
    try:
        datastore = LocalDatastore(str(setup["store"]), extensions=["*.nii.gz"], auto_reload=False)
        request = {"model": "fewshot", "images": ["image_184", "image_195", "image_199"], "label_tag": "original"}
        generation = manifest_snapshot(SupportBank.read_manifest(setup["bank_dir"]))
        output = setup["output"]
        before = _records(output) if (output / MANIFEST_NAME).is_file() else []
        idle, started = list(pool.idle), pool.started
        result = task(request, datastore, None)
        assert result == {i: {"label": i, "label_tag": "original", "bank_generation": generation}
                          for i in request["images"]}
        assert pool.idle == idle and pool.started == started  # the module's pool was not used
        for image_id in request["images"]:
            saved = Path(datastore.get_label_uri(image_id, "original"))
            np.testing.assert_array_equal(np.asarray(nib.load(str(saved)).dataobj),
                                          np.asarray(nib.load(str(output / f"{image_id}.nii.gz")).dataobj))
        saved = Path(datastore.get_label_uri("image_199", "original"))  # the added image, from the app's own worker
        np.testing.assert_array_equal(np.asarray(nib.load(str(saved)).dataobj), reference.segment(added).label)
        saved.unlink()
        again = task(request, datastore, None)
        assert again == result and Path(datastore.get_label_uri("image_199", "original")).is_file()
        # Segmented once each, by whichever ran first (the batch test before it: the app's request found
        # those done, and segmented only the added image, on the one worker it started).
        records = [r for r in _records(output) if r["kind"] == "case"]
        assert sorted(r["case"] for r in records if r["case"] in request["images"]) == request["images"]
        if before:
            assert records[:-1] == [r for r in before if r["kind"] == "case"] and records[-1]["case"] == "image_199"
            runs = [r for r in _records(output)[len(before):] if r["kind"] == "run" and r["event"] == "start"]
            assert len(runs) == 1 and len(runs[0]["workers"]) == 1 and runs[0]["todo"] == 1
    finally:
        added.unlink()


def test_dicomweb_url_series_named_by_uid_on_their_own_grid(ray_local, pool, setup, reference, models_dir, tmp_path):
    """The batch's input is a real Orthanc's DICOMweb URL (QIDO filter in its query; a study's URL
    names its series only): each image series is a case named by its SeriesInstanceUID, downloaded
    by the worker, and segmented onto the series' own grid with the labels Engine.segment gives the
    same voxels; the manifest records the series' stamp (its instances' UIDs), so a second run asks
    the server and skips both; a series that gains an instance is segmented again."""
    from orthanc_harness import Orthanc, orthanc_or_skip, upload_volume

    orthanc_or_skip()
    hippo = shared_dataset("msd-hippocampus")
    assert not np.allclose(nib.load(str(setup["folder"] / "flipped.nii.gz")).affine, np.eye(4))
    (tmp_path / "orthanc").mkdir()
    orthanc = Orthanc(tmp_path / "orthanc")
    try:
        # The flipped scan (x axis reversed in voxels and affine) has a grid that is not the identity.
        sources = {"195": hippo / "image_195.nii.gz", "flipped": setup["folder"] / "flipped.nii.gz"}
        series = {case: upload_volume(orthanc, nib.load(str(path)), f"hippo-{case}") for case, path in sources.items()}
        cases = inputs.collect(orthanc.dicomweb + "?Modality=MR")
        assert sorted(c.case_id for c in cases) == sorted(s["series"] for s in series.values())
        one = series["flipped"]
        assert [c.case_id for c in inputs.collect(f"{orthanc.dicomweb}/studies/{one['study']}")] == [one["series"]]
        with pytest.raises(inputs.InputError, match="no image series"):
            inputs.collect(f"{orthanc.dicomweb}/studies/{one['study']}/series/1.2.3")

        output = tmp_path / "out"
        spec = _spec(setup, output, models_dir)
        idle, started = len(pool.idle), pool.started
        report = run_batch(cases, spec, RayOptions(workers=2), progress=False, pool=pool)
        assert report.done == 2 and not report.failed and not report.error, report
        assert pool.started - started == max(0, 2 - idle)  # the pool's warm workers, loaded with this batch
        assert len(pool.idle) == 2
        finals = {r["case"]: r for r in _records(output) if r["kind"] == "case"}
        for case, s in series.items():
            record = finals[s["series"]]
            assert record["input"] == f"{orthanc.dicomweb}/studies/{s['study']}/series/{s['series']}"
            assert record["input_stamp"].startswith(f"dicomweb:{s['voxels'].shape[2]}:")
            assert record["bank_generation"] == report.bank_generation
            written = nib.load(str(output / f"{s['series']}.nii.gz"))
            assert written.shape == s["voxels"].shape
            np.testing.assert_allclose(written.affine, s["affine"], atol=1e-4)
            as_nifti = tmp_path / f"image_{case}.nii.gz"  # the same voxels on the same grid, as a file
            nib.save(nib.Nifti1Image(s["voxels"], s["affine"]), str(as_nifti))
            np.testing.assert_array_equal(np.asarray(written.dataobj), reference.segment(str(as_nifti)).label)

        again = run_batch(cases, spec, RayOptions(workers=2), progress=False, pool=pool)
        assert again.skipped == 2 and not again.workers

        # One more slice in a series: another instance, so another stamp.
        import copy

        from pydicom.uid import generate_uid

        extra = copy.deepcopy(series["195"]["datasets"][-1])
        extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        orthanc.client().store_instances([extra])
        with Manifest(output) as m:
            assert m.plan(cases, report.bank_generation, spec.settings_key()).reasons == {series["195"]["series"]: "input changed"}
    finally:
        orthanc.stop()


def test_a_case_over_the_timeout_is_failed_and_its_worker_replaced(ray_local, pool, setup, models_dir, tmp_path):
    """One worker, --case-timeout: a case whose input never arrives (a named pipe nobody writes: its
    read blocks in the kernel, as on a hung network mount, where no exception reaches it) is recorded
    as failed with the timeout; its worker is killed and a new one, on the same pinned generation,
    segments the next case (an idle worker of the pool when it has one, as here after the tests above).
    A re-run retries the timed-out case and skips the finished one."""
    stuck = tmp_path / "stuck.nii.gz"
    os.mkfifo(stuck)
    cases = [inputs.Case("stuck", str(stuck)), inputs.Case("after", str(setup["store"] / "image_195.nii.gz"))]
    output = tmp_path / "out"
    spec = _spec(setup, output, models_dir)
    # The limit is 10x a case of these small scans on an idle core, and the stuck case never ends.
    options = RayOptions(workers=1, case_timeout=TIMEOUT)
    report = run_batch(cases, spec, options, progress=False, pool=pool)
    assert not report.error and not report.interrupted
    assert report.done == 1 and report.failed == 1, report
    finals = {r["case"]: r for r in _records(output) if r["kind"] == "case"}
    assert finals["stuck"]["status"] == "failed" and finals["stuck"]["timed_out"]
    assert f"still running after {TIMEOUT:g} s" in finals["stuck"]["error"]
    assert finals["stuck"]["seconds"] >= TIMEOUT
    assert finals["after"]["status"] == "done"
    first, second = report.workers  # the one that got stuck, then its replacement
    assert finals["stuck"]["worker"] == first["worker"] and finals["after"]["worker"] == second["worker"] != first["worker"]
    assert first["bank_generation"] == second["bank_generation"] == finals["after"]["bank_generation"]
    assert _stopped(int(first["worker"].rsplit(":", 1)[1])), "the stuck worker's process is still running"
    with Manifest(output) as m:
        again = m.plan(cases, report.bank_generation, spec.settings_key())
    assert again.reasons == {"stuck": "failed before"}
