"""The app on a real DICOMweb server, driven the way OHIF's MONAI Label panel drives it.

This module starts its own Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) on loopback, on
free ports, with a temporary storage folder and no authentication. Three CHAOS T2 volumes from
../shared/data become DICOM MR series (written with pydicom, geometry tags from each volume's
affine, so the app's NIfTI conversion gives back the same affine); one of them gets an existing
final label as a DICOM SEG made the way another tool would (only the slices with segments,
segments numbered in its own order and named). The app then starts on
``--studies http://127.0.0.1:<port>/dicom-web`` with ``-c preset random-tiny`` and is driven with
MONAI Label's client: ``/info``, ``/infer`` with OHIF's NRRD parameters, final labels saved as a
NIfTI and as OHIF's raw ``label.bin``, bad uploads, and a restart after the PACS changed. A second
server (issue 12), on its own cache, with the app's own search filter and ``-c pacs_poll_seconds 1``:
MR series are listed, a SEG another tool stores while it runs reaches the bank, and partial
annotations (SEG frames, ``annotated_slices``) put only their annotated slices in the bank.

Skipped with a message when Orthanc, its DICOMweb plugin or the shared data are absent.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import quote_plus

import nibabel as nib
import numpy as np
import pytest

from app_harness import Server, expected_dice, tree_digest
from orthanc_harness import Orthanc, dicom_series, orthanc_or_skip, right_handed
from test_app_server import CHAOS

LABELS = {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
SEEDED, INFERRED, RAW = "1", "3", "5"  # a SEG on the PACS before start-up; infer + NIfTI save; OHIF's label.bin
CASES = (SEEDED, INFERRED, RAW)
# The seeded SEG numbers its segments its own way; the app must map them by SegmentLabel.
FOREIGN_NUMBERS = {"spleen": 1, "liver": 2, "right_kidney": 3, "left_kidney": 4}
# What OHIF's MonaiLabelClient.infer sends.
OHIF_INFER = {"result_extension": ".nrrd", "result_dtype": "uint16", "result_compress": False, "restore_label_idx": False}
READY_TIMEOUT = 240
SYNC_TIMEOUT = 180
SEARCH_FILTER_ENV = "MONAI_LABEL_DICOMWEB_SEARCH_FILTER"
MR = {"Modality": "MR"}  # what the first server is told through the environment (MONAI Label's default is CT)
POLL_SECONDS = 1.0  # the polling server's -c pacs_poll_seconds (short, for the test)



def dicomweb_test(fn):
    """A test that drives the real server on a real Orthanc and the real data."""
    return pytest.mark.server(pytest.mark.shared_data(pytest.mark.slow(fn)))


# ---------------------------------------------------------------------------------------------
# volumes as DICOM


def foreign_seg(label: np.ndarray, affine: np.ndarray, series: list, numbers: dict[str, int]):
    """A DICOM SEG as another tool writes one: empty slices left out, segments numbered by
    ``numbers`` and named, on the image's frame of reference."""
    import pydicom_seg
    import SimpleITK as sitk

    renumbered = np.zeros(label.shape, np.uint8)
    for name, number in numbers.items():
        renumbered[label == LABELS[name]] = number
    image = sitk.GetImageFromArray(renumbered.transpose(2, 1, 0))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    template = pydicom_seg.template.from_dcmqi_metainfo({
        "ContentCreatorName": "other tool", "SeriesDescription": "liver and kidneys", "SeriesNumber": "42",
        "InstanceNumber": "1", "ContentLabel": "SEGMENTATION", "ContentDescription": "seeded final label",
        "ClinicalTrialSeriesID": "1", "ClinicalTrialTimePointID": "1", "ClinicalTrialCoordinatingCenterName": "test",
        "BodyPartExamined": "",
        "segmentAttributes": [[{
            "labelID": number, "SegmentLabel": name, "SegmentDescription": name, "SegmentAlgorithmType": "MANUAL",
            "SegmentedPropertyCategoryCodeSequence": {"CodeValue": "123037004", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Anatomical Structure"},
            "SegmentedPropertyTypeCodeSequence": {"CodeValue": "10200004", "CodingSchemeDesignator": "SCT", "CodeMeaning": name},
            "recommendedDisplayRGBValue": [200, 100, 50],
        } for name, number in numbers.items()]],
    })
    seg = pydicom_seg.MultiClassWriter(template=template, skip_empty_slices=True).write(image, series)
    seg.FrameOfReferenceUID = series[0].FrameOfReferenceUID
    return seg


def decode_seg(seg) -> dict:
    """Label value per voxel (x, y, z) and the segments' names, as a viewer reads the SEG."""
    import pydicom_seg
    import SimpleITK as sitk

    result = pydicom_seg.MultiClassReader().read(seg)
    return {
        "numbers": sitk.GetArrayFromImage(result.image).transpose(2, 1, 0),
        "names": {int(n): str(s.SegmentLabel) for n, s in result.segment_infos.items()},
        "origin": result.image.GetOrigin(),
    }


# ---------------------------------------------------------------------------------------------
# Orthanc


class DicomWebServer(Server):
    """The app's server on the Orthanc's DICOMweb URL, MONAI Label's cache under ``cache``."""

    def __init__(self, orthanc: Orthanc, cache: Path, models_dir: Path, log: Path, extra=(), search_filter: dict | None = MR):
        """``search_filter``: set through MONAI Label's environment variable; None: the app's own default."""
        self.tmp = cache.parent / "server-tmp"  # the server's temporary folder, to see what it leaves there
        self.tmp.mkdir(exist_ok=True)
        env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(cache), "TMPDIR": str(self.tmp)}
        if search_filter is not None:
            env[SEARCH_FILTER_ENV] = json.dumps(search_filter)
        labels = ",".join(f"{n}={v}" for n, v in LABELS.items())
        super().__init__(orthanc.dicomweb, models_dir, log, extra=[("labels", labels), ("bank.augmentations_per_slice", "0"), *extra], env=env)
        if search_filter is None:
            self.env.pop(SEARCH_FILTER_ENV, None)
        self.cache = cache

    def manifest(self) -> dict:
        return json.loads((self.root() / ".fewshot" / f"bank-{self.preset}" / "manifest.json").read_text())

    def wait_until_in_bank(self, image_id: str, timeout: float = SYNC_TIMEOUT) -> dict:
        """Until ``image_id`` is in the bank and the worker is idle (generous: a wait, not a timing)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            bank = self.bank()
            if image_id in bank["image_ids"]:
                return self.wait_bank_idle(max(1.0, deadline - time.time()))
            time.sleep(0.25)
        pytest.fail(f"{image_id} not in the bank after {timeout} s: {self.bank()['pacs']}\n{self.log()[-3000:]}")

    def root(self) -> Path:
        (root,) = [p for p in self.cache.iterdir() if p.is_dir()]  # <cache>/<md5 of the URL>, as MONAI Label names it
        return root

    def wait_synced(self, timeout: float = SYNC_TIMEOUT) -> dict:
        """Until the start-up sync with the PACS is done and the bank worker is idle."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            bank = self.bank()
            if bank["pacs"].get("state") == "done":
                return self.wait_bank_idle(max(1.0, deadline - time.time()))
            time.sleep(0.25)
        pytest.fail(f"PACS sync not done after {timeout} s: {self.bank()['pacs']}\n{self.log()[-3000:]}")


# ---------------------------------------------------------------------------------------------
# fixtures


def chaos(case: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    return right_handed(nib.load(CHAOS / f"{kind}_{case}.nii.gz"))


@pytest.fixture(scope="module")
def dw_tmp(tmp_path_factory) -> Path:
    orthanc_or_skip()
    if not CHAOS.is_dir() or not any(CHAOS.glob("image_*")):
        pytest.skip(f"real data {CHAOS} is absent (it lives in ../shared/data beside the project)")
    return tmp_path_factory.mktemp("dicomweb")


@pytest.fixture(scope="module")
def orthanc(dw_tmp):
    root = dw_tmp / "orthanc"
    root.mkdir()
    server = Orthanc(root)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pacs(orthanc) -> dict:
    """The PACS's content: three MR series; the first with a final label (a foreign SEG)."""
    from pydicom.uid import generate_uid

    client, series = orthanc.client(), {}
    for case in CASES:
        uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
        data, affine = chaos(case, "image")
        datasets = dicom_series(data, affine, f"CHAOS-T2-{case}", uids)
        client.store_instances(datasets)
        series[case] = dict(uids, datasets=datasets, affine=affine, voxels=np.rint(data).astype(np.int16))
    label, affine = chaos(SEEDED, "label")
    seg = foreign_seg(label.astype(np.uint8), affine, series[SEEDED]["datasets"], FOREIGN_NUMBERS)
    assert decode_seg(seg)["numbers"].shape[2] < label.shape[2]  # only the slices with segments, as other tools write
    client.store_instances([seg])
    series[SEEDED]["seg"] = str(seg.SeriesInstanceUID)
    assert len(orthanc.segs()) == 1
    return series


@pytest.fixture(scope="module")
def server(pacs, orthanc, models_dir, dw_tmp):
    srv = DicomWebServer(orthanc, dw_tmp / "cache", models_dir, dw_tmp / "server.log").start()
    srv.wait_ready(READY_TIMEOUT)
    yield srv
    srv.stop()


def uid(pacs: dict, case: str) -> str:
    return pacs[case]["series"]


def cached_image(server: DicomWebServer, pacs: dict, case: str) -> Path:
    return server.root() / f"{uid(pacs, case)}.nii.gz"


def cached_label(server: DicomWebServer, pacs: dict, case: str) -> Path:
    return server.root() / "labels" / "final" / f"{uid(pacs, case)}.nii.gz"


def segs_of(orthanc: Orthanc, series_uid: str) -> dict:
    return {
        k: meta for k, meta in orthanc.segs().items()
        if any(str(ref.SeriesInstanceUID) == series_uid for ref in meta.get("ReferencedSeriesSequence", []))
    }


def values(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def ohif_label_info(info_labels: list[str]) -> list[dict]:
    """OHIF's Submit Label (ActiveLearning.onClickSubmitLabel -> createSegmentMetadata): one entry
    per /info label but background, segmentIndex = the label's position in /info's list."""
    return [
        {"id": f"0+{i}", "color": [255, 0, 0, 255], "labelmapIndex": 0, "name": name, "segmentIndex": i, "description": "",
         "meta": {"SegmentLabel": name, "SegmentAlgorithmType": "SEMIAUTOMATIC", "SegmentAlgorithmName": "MONAI"}}
        for i, name in enumerate(info_labels) if name != "background"
    ]


def put_label(server: DicomWebServer, series_uid: str, path: Path, params: dict | None = None, tag: str | None = None) -> tuple[int, str]:
    selector = f"/datastore/label?image={quote_plus(series_uid)}" + (f"&tag={quote_plus(tag)}" if tag else "")
    return server.request("PUT", selector, files={"label": str(path)}, fields={"params": json.dumps(params or {})})


def stable_digest(root: Path) -> dict[str, str]:
    """The cache, minus what MONAI Label itself rewrites on reads."""
    return {k: v for k, v in tree_digest(root).items() if not k.endswith(".lock")}


# ---------------------------------------------------------------------------------------------
# tests, in the order a user's session would run


@dicomweb_test
def test_startup_fetches_the_final_label_from_the_pacs_and_ingests_it(server, pacs):
    bank = server.wait_synced()
    sync = bank["pacs"]
    assert sync["state"] == "done" and sync["fetched"] == [uid(pacs, SEEDED)] and not sync["failed"], sync
    assert sync["series"] == len(CASES) and sync["labelled"] == 1
    assert bank["images"] == 1 and bank["image_ids"] == [uid(pacs, SEEDED)]
    assert set(bank["per_label"]) == set(LABELS)
    info = server.client().info()
    assert info["labels"] == ["background", *LABELS]  # OHIF drops the first, builds segments from the rest
    assert info["datastore"]["total"] == len(CASES) and info["datastore"]["completed"] == 1
    assert "itkimage2segimage" not in server.log() and not (Path(server.cmd[server.cmd.index("--app") + 1]) / "bin" / "itkimage2segimage").exists()

    # The series came back from DICOM with its volume's affine and voxels.
    image = nib.load(cached_image(server, pacs, SEEDED))
    assert np.allclose(image.affine, pacs[SEEDED]["affine"], atol=1e-4)
    assert np.array_equal(np.asarray(image.dataobj), pacs[SEEDED]["voxels"])
    # The foreign SEG (cropped to its slices, segments numbered its own way) became the label
    # with the app's values, on the image's grid.
    label, _ = chaos(SEEDED, "label")
    cached = nib.load(cached_label(server, pacs, SEEDED))
    assert cached.shape == image.shape and np.allclose(cached.affine, image.affine, atol=1e-4)
    assert np.array_equal(np.asarray(cached.dataobj), label.astype(np.uint8))


@dicomweb_test
def test_infer_as_ohif_asks_returns_nrrd_on_the_series_grid(server, pacs):
    import SimpleITK as sitk
    from monailabel.client.client import MONAILabelUtils

    from fewshot.volume import read_volume

    server.wait_synced()
    series_uid = uid(pacs, INFERRED)
    # OHIF: POST /infer/<model>?image=<SeriesInstanceUID>&output=all, a multipart answer.
    status, form, files, _ = MONAILabelUtils.http_multipart(
        "POST", server.url, f"/infer/fewshot?image={series_uid}&output=all", {"params": json.dumps(OHIF_INFER)}, {},
    )
    assert status == 200, form
    form = json.loads(form) if isinstance(form, (str, bytes)) else form
    result = json.loads(form["params"]) if isinstance(form.get("params"), str) else form.get("params")
    (data,) = files.values()
    out = server.log_path.parent / "ohif_result.nrrd"
    out.write_bytes(data if isinstance(data, bytes) else data.encode())
    assert b"type: uint16" in data[:400] and b"encoding: raw" in data[:400]
    assert set(result["segmented"]) == set(LABELS) and result["centroids"] == {}

    converted = cached_image(server, pacs, INFERRED)  # downloaded and converted for this request
    image, label = read_volume(converted), read_volume(out)
    assert label.shape == image.shape and np.allclose(label.affine, image.affine, atol=1e-4)
    ref, nrrd = sitk.ReadImage(str(converted)), sitk.ReadImage(str(out))
    assert nrrd.GetSize() == ref.GetSize()
    for a, b in ((nrrd.GetOrigin(), ref.GetOrigin()), (nrrd.GetSpacing(), ref.GetSpacing()), (nrrd.GetDirection(), ref.GetDirection())):
        assert np.allclose(a, b, atol=1e-4)
    assert set(np.unique(sitk.GetArrayFromImage(nrrd)).tolist()) <= {0, *LABELS.values()}
    assert np.allclose(image.affine, pacs[INFERRED]["affine"], atol=1e-4)


@dicomweb_test
def test_bad_uploads_get_4xx_and_store_nothing(server, pacs, orthanc, dw_tmp):
    server.wait_synced()
    root = server.root()
    target = uid(pacs, INFERRED)
    server.client().infer("fewshot", target, {})  # make sure its series is cached: checks run against it
    before, segs_before, bank_before = stable_digest(root), set(orthanc.segs()), server.bank()
    image = nib.load(cached_image(server, pacs, INFERRED))
    truth, _ = chaos(INFERRED, "label")
    bad = dw_tmp / "bad"
    bad.mkdir()

    def nifti(name: str, data, affine=image.affine) -> Path:
        nib.save(nib.Nifti1Image(np.asarray(data), affine), bad / name)
        return bad / name

    (bad / "garbage.nii.gz").write_bytes(b"garbage")
    (bad / "notes.txt").write_text("not a label")
    shifted = image.affine.copy()
    shifted[:3, 3] += 40.0
    unknown = truth.astype(np.uint8).copy()
    unknown[unknown == 4] = 9
    raw_dir = bad / "raw"
    raw_dir.mkdir()
    (raw_dir / "label.bin").write_bytes(b"\0" * 1000)
    (bad / "raw9").mkdir()
    (bad / "raw9" / "label.bin").write_bytes(unknown.ravel(order="F").tobytes())
    painted = truth.astype(np.uint8).copy()
    painted[painted == 4] = 5  # OHIF segment index 5: a segment the app has no label for
    (bad / "raw_unknown").mkdir()
    (bad / "raw_unknown" / "label.bin").write_bytes(painted.ravel(order="F").tobytes())
    ohif_info = ohif_label_info(["background", *LABELS, "tumour"])
    good = nifti("good.nii.gz", truth.astype(np.uint8))
    seg_uid = pacs[SEEDED]["seg"]
    cases = [
        # (method, selector, files, fields, status, words in the message)
        ("PUT", "/datastore/label?image=1.2.3.4.5", {"label": str(good)}, None, 404, "unknown image id"),
        ("PUT", f"/datastore/label?image={seg_uid}", {"label": str(good)}, None, 404, "unknown image id"),
        ("PUT", f"/datastore/label?image={quote_plus('../../etc/passwd')}", {"label": str(good)}, None, 400, "invalid image id"),
        ("PUT", "/datastore/label?image=image_3", {"label": str(good)}, None, 400, "SeriesInstanceUID"),
        ("PUT", f"/datastore/label?image={target}&tag={quote_plus('../x')}", {"label": str(good)}, None, 400, "invalid label tag"),
        ("PUT", f"/datastore/label?image={target}", {"label": str(nifti('small.nii.gz', np.zeros((10, 10, 10), np.uint8)))}, None, 422, "does not match image shape"),
        ("PUT", f"/datastore/label?image={target}", {"label": str(nifti('moved.nii.gz', truth.astype(np.uint8), shifted))}, None, 422, "affine"),
        ("PUT", f"/datastore/label?image={target}", {"label": str(bad / "garbage.nii.gz")}, None, 422, "not a valid NIfTI"),
        ("PUT", f"/datastore/label?image={target}", {"label": str(bad / "notes.txt")}, None, 415, "file type"),
        ("PUT", f"/datastore/label?image={target}", {"label": str(nifti('nine.nii.gz', unknown))}, None, 422, "[9] are not among the configured labels"),
        ("PUT", f"/datastore/label?image={target}", {"label": str(nifti('empty.nii.gz', np.zeros(image.shape, np.uint8)))}, None, 422, "is empty"),
        ("PUT", f"/datastore/label?image={target}", {"label": str(raw_dir / "label.bin")}, None, 422, "has 1000 bytes"),
        ("PUT", f"/datastore/label?image={target}", {"label": str(bad / "raw9" / "label.bin")}, None, 422, "[9] are not among the configured labels"),
        ("PUT", f"/datastore/label?image={target}", {"label": str(bad / "raw_unknown" / "label.bin")},
         {"params": json.dumps({"label_info": ohif_info})}, 422, "['tumour'] are not labels of this app"),
        ("PUT", f"/datastore/label?image={target}", {"label": str(good)}, {"params": "[1]"}, 400, "must be a JSON object"),
        ("PUT", f"/datastore/label?image={target}", {"label": str(good)}, {"params": json.dumps({"dicom_seg": {}})}, 400, "may not set ['dicom_seg']"),
        ("PUT", f"/datastore/image?image={target}", {"file": str(cached_image(server, pacs, INFERRED))}, None, 405, "images come from the PACS"),
        ("DELETE", f"/datastore/image?id={target}", None, None, 405, "remove the series there"),
        ("DELETE", f"/datastore/label?id={uid(pacs, SEEDED)}&tag=final", None, None, 405, "cannot delete"),
        ("POST", "/infer/fewshot?image=1.2.3.4.5", None, None, 404, "unknown image id"),
        ("POST", f"/infer/fewshot?image={seg_uid}", None, None, 404, "unknown image id"),
        ("POST", f"/infer/fewshot?image={quote_plus('../x')}", None, None, 400, "invalid image id"),
    ]
    failures = []
    for method, selector, files, fields, expected, words in cases:
        if files is None:
            status, body = server.request(method, selector)
        else:
            status, body = server.request(method, selector, files=files, fields=fields)
        if status != expected or words not in body:
            failures.append(f"{method} {selector} {fields or ''}: {status} {body[:300]} (expected {expected} with {words!r})")
    assert not failures, "\n".join(failures)
    time.sleep(1.0)  # a wrongly queued ingestion would show now
    after = server.wait_bank_idle()
    assert set(orthanc.segs()) == segs_before  # nothing reached the PACS
    assert stable_digest(root) == before  # nor the cache, the bank or the scratch space
    left = [p.name for p in server.tmp.iterdir() if p.name.endswith((".nii.gz", ".bin", ".txt", ".dcm", ".nrrd"))]
    assert not left, f"refused uploads left in the server's temporary folder: {left}"
    assert (after["images"], after["slices"]) == (bank_before["images"], bank_before["slices"])


@dicomweb_test
def test_saving_a_final_label_stores_a_seg_on_the_pacs_and_grows_the_bank(server, pacs, orthanc, dw_tmp):
    before = server.wait_synced()
    series_uid = uid(pacs, INFERRED)
    truth, affine = chaos(INFERRED, "label")
    path = dw_tmp / "label_3.nii.gz"
    nib.save(nib.Nifti1Image(truth.astype(np.uint8), affine), path)
    result_file, result = server.client().infer("fewshot", series_uid, {})  # the prediction its save will review
    predicted = np.asarray(nib.load(result_file).dataobj)
    start = time.perf_counter()
    response = server.client().save_label(series_uid, str(path))
    seconds = time.perf_counter() - start
    assert response["label"] == series_uid
    queued = response["support_bank"]["ingestion"]
    assert series_uid in queued["pending"] or queued["current"] == series_uid
    print(f"\nPUT /datastore/label (DICOM SEG written and stored on the PACS) answered in {seconds:.2f} s")

    (seg_uid, meta), = segs_of(orthanc, series_uid).items()
    source = pacs[INFERRED]["datasets"][0]
    assert str(meta.FrameOfReferenceUID) == str(source.FrameOfReferenceUID)  # OHIF overlays it on the series
    assert str(meta.StudyInstanceUID) == pacs[INFERRED]["study"] and str(meta.PatientID) == str(source.PatientID)
    (seg,) = orthanc.retrieve(pacs[INFERRED]["study"], seg_uid)
    decoded = decode_seg(seg)
    assert decoded["names"] == {v: n for n, v in LABELS.items()}
    assert np.array_equal(decoded["numbers"], truth.astype(np.uint8))

    grown = server.wait_bank_idle()
    assert grown["images"] == before["images"] + 1 and series_uid in grown["image_ids"]
    assert np.array_equal(values(cached_label(server, pacs, INFERRED)), truth.astype(np.uint8))
    info = server.client().info()
    assert info["datastore"]["completed"] == 2
    # The series' prediction, reviewed against the label stored on the PACS (lib/reviews.py).
    review = info["models"]["fewshot"]["reviews"]["recent"][0]
    assert review["image_id"] == series_uid and review["bank_images"] == before["images"], review
    assert review["dice"] == expected_dice(predicted, truth.astype(np.uint8), result["segmented"]) != {}, review


@dicomweb_test
def test_ohif_raw_label_is_converted_with_the_series_geometry(server, pacs, orthanc, dw_tmp):
    before = server.wait_synced()
    series_uid = uid(pacs, RAW)
    info = server.client().info()
    truth, _ = chaos(RAW, "label")
    folder = dw_tmp / "ohif"
    folder.mkdir()
    # OHIF's Submit Label: the label volume's scalar buffer (uint8, x fastest) sent as label.bin.
    (folder / "label.bin").write_bytes(truth.astype(np.uint8).ravel(order="F").tobytes())
    status, body = put_label(server, series_uid, folder / "label.bin", {"label_info": ohif_label_info(info["labels"])})
    assert status == 200, body

    (seg_uid, meta), = segs_of(orthanc, series_uid).items()
    assert str(meta.FrameOfReferenceUID) == str(pacs[RAW]["datasets"][0].FrameOfReferenceUID)
    (seg,) = orthanc.retrieve(pacs[RAW]["study"], seg_uid)
    assert np.array_equal(decode_seg(seg)["numbers"], truth.astype(np.uint8))

    grown = server.wait_bank_idle()
    assert grown["images"] == before["images"] + 1 and series_uid in grown["image_ids"]
    cached = nib.load(cached_label(server, pacs, RAW))
    assert np.allclose(cached.affine, pacs[RAW]["affine"], atol=1e-4)
    assert np.array_equal(np.asarray(cached.dataobj), truth.astype(np.uint8))
    # Every series is labelled now: the strategies have nothing to propose.
    assert server.client().next_sample("bank_coverage", {}) == {}


@dicomweb_test
def test_restart_with_the_pacs_down_then_back_follows_its_changes(server, pacs, orthanc, models_dir, dw_tmp):
    """While the server is down, the SEG of one series is deleted on the PACS and another tool
    stores a newer SEG for a second one; then the PACS goes down. The server starts on its cache
    (the bank reloaded, not rebuilt), answers /info, and refuses a save with a 502 storing nothing.
    When the PACS is back, the retried sync drops the deleted label from the cache and the bank,
    fetches the newer one, and leaves the unchanged one alone."""
    server.wait_synced()
    log_before = len(server.log())
    server.stop()
    for seg_uid in segs_of(orthanc, uid(pacs, INFERRED)):
        orthanc.delete_series(seg_uid)
    truth, affine = chaos(RAW, "label")
    newer = truth.astype(np.uint8).copy()
    newer[newer == 4] = 0  # the spleen taken out
    time.sleep(0.01)  # the newer SEG's series time is later
    orthanc.client().store_instances([foreign_seg(newer, affine, pacs[RAW]["datasets"], {"liver": 1, "right_kidney": 2, "left_kidney": 3})])
    orthanc.stop()

    again = DicomWebServer(orthanc, server.cache, models_dir, server.log_path).start()
    try:
        again.wait_ready(READY_TIMEOUT)
        deadline = time.time() + SYNC_TIMEOUT
        while not again.bank()["pacs"].get("attempts") and time.time() < deadline:
            time.sleep(0.25)
        down = again.wait_bank_idle()
        assert down["pacs"]["state"] != "done" and "cannot be searched" in down["pacs"]["error"], down["pacs"]
        assert down["images"] == 3  # the cache's labels, as they were
        log = again.log()[log_before:]
        assert "support bank reloaded from" in log and "3 images" in log  # reloaded, not rebuilt
        info = again.client().info()
        assert info["datastore"]["completed"] == 3 and "cannot be searched" in info["datastore"]["error"]
        root = again.root()
        cached_before = stable_digest(root)
        status, body = put_label(again, uid(pacs, SEEDED), cached_label(again, pacs, SEEDED))
        assert status == 502 and "did not store the DICOM SEG" in body and "nothing was saved" in body, (status, body)
        assert stable_digest(root) == cached_before

        orthanc.start()
        bank = again.wait_synced()
        sync = bank["pacs"]
        assert sync["state"] == "done" and sync["attempts"] >= 1, sync
        assert sync["removed"] == [uid(pacs, INFERRED)] and sync["fetched"] == [uid(pacs, RAW)] and not sync["failed"], sync
        assert sorted(bank["image_ids"]) == sorted([uid(pacs, SEEDED), uid(pacs, RAW)])
        assert not cached_label(again, pacs, INFERRED).exists()
        assert np.array_equal(values(cached_label(again, pacs, RAW)), newer)
        assert f"bank: ingesting '{uid(pacs, SEEDED)}'" not in again.log()[log_before:]  # its SEG did not change
        assert again.client().info()["datastore"]["completed"] == 2
        assert again.client().next_sample("bank_coverage", {})["id"] == uid(pacs, INFERRED)
    finally:
        again.stop()


# ---------------------------------------------------------------------------------------------
# issue 12: a server with the app's own search filter that polls the PACS (its own cache, so it
# never shares one with the first server)


@pytest.fixture(scope="module")
def live(pacs, orthanc, models_dir, dw_tmp):
    srv = DicomWebServer(orthanc, dw_tmp / "live-cache", models_dir, dw_tmp / "live.log",
                         extra=[("pacs_poll_seconds", str(POLL_SECONDS))], search_filter=None).start()
    srv.wait_ready(READY_TIMEOUT)
    yield srv
    srv.stop()


def busiest_slices(label: np.ndarray, count: int) -> list[int]:
    """``count`` slices along the third axis with the most labelled voxels, apart from each other."""
    voxels = (label > 0).sum(axis=(0, 1))
    chosen: list[int] = []
    for z in (int(z) for z in np.argsort(-voxels, kind="stable") if voxels[z]):
        if all(abs(z - c) > 2 for c in chosen):
            chosen.append(z)
        if len(chosen) == count:
            break
    return sorted(chosen)


def seg_slices(seg, affine: np.ndarray) -> list[int]:
    """The image slices (third voxel axis) a SEG holds frames for."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    inverse = np.linalg.inv(lps)
    out = set()
    for item in seg.PerFrameFunctionalGroupsSequence:
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        out.add(int(round((inverse @ [*position, 1.0])[2])))
    return sorted(out)


@dicomweb_test
def test_mr_series_are_images_without_any_search_filter(live, pacs):
    """MONAI Label 0.8.5 lists CT only unless MONAI_LABEL_DICOMWEB_SEARCH_FILTER says otherwise;
    the app lists every modality (SEG never) unless -c dicomweb_search_filter narrows it."""
    assert SEARCH_FILTER_ENV not in live.env
    live.wait_synced()
    info = live.client().info()
    assert info["datastore"]["total"] == len(CASES), info["datastore"]
    assert live.client().next_sample("first", {})["id"] in {uid(pacs, case) for case in CASES}
    assert "search filter {}" in live.log()
    pacs_status = info["models"]["fewshot"]["support_bank"]["pacs"]
    assert pacs_status["poll_seconds"] == POLL_SECONDS, pacs_status


@dicomweb_test
def test_a_seg_another_tool_stores_is_picked_up_while_running_and_only_its_frames_count(live, pacs, orthanc):
    """Another tool stores a SEG drawn on two slices while the server runs: within the poll interval
    it is fetched and ingested, and only those two slices enter the bank (no negatives)."""
    before = live.wait_synced()
    series_uid = uid(pacs, INFERRED)
    assert not segs_of(orthanc, series_uid) and series_uid not in before["image_ids"]
    truth, affine = chaos(INFERRED, "label")
    slices = busiest_slices(truth, 2)
    drawn = np.zeros(truth.shape, np.uint8)
    drawn[:, :, slices] = truth[:, :, slices]
    names = {n: v for n, v in FOREIGN_NUMBERS.items() if (drawn == LABELS[n]).any()}
    seg = foreign_seg(drawn, affine, pacs[INFERRED]["datasets"], names)
    assert seg_slices(seg, affine) == slices  # frames for the drawn slices only, as other tools write
    stored_at = time.perf_counter()
    orthanc.client().store_instances([seg])

    bank = live.wait_until_in_bank(series_uid)
    # A figure, not an assertion: the poll interval here is 1 s (30 s by default), plus fetch and ingestion.
    print(f"\nSEG stored by another tool -> in the bank after {time.perf_counter() - stored_at:.1f} s (poll every {POLL_SECONDS} s)")
    entry = live.manifest()["images"][series_uid]
    assert entry["entries"] == len(slices), entry  # no organ-free negatives from the 29 other slices
    assert entry["source"]["annotation"]["slices"] == slices and entry["source"]["annotation"]["how"] == "SEG frames and segments"
    assert bank["partial_annotations"][series_uid]["slices"] == slices
    assert bank["negative_slices"] == before["negative_slices"]
    cached = np.asarray(nib.load(live.root() / "labels" / "final" / f"{series_uid}.nii.gz").dataobj)
    assert np.array_equal(cached, drawn)
    assert live.bank()["pacs"]["fetched"] == [series_uid]


@dicomweb_test
def test_a_partial_save_stores_frames_for_its_annotated_slices_only(live, pacs, orthanc, dw_tmp):
    """PUT /datastore/label with annotated_slices: the SEG on the PACS holds frames for those slices
    only (what any reader, this app included, takes as the annotated part), and the bank holds them."""
    live.wait_synced()
    series_uid = uid(pacs, RAW)
    truth, affine = chaos(RAW, "label")
    slices = busiest_slices(truth, 3)
    path = dw_tmp / "partial_raw.nii.gz"
    nib.save(nib.Nifti1Image(truth.astype(np.uint8), affine), path)  # the whole result, reviewed on 3 slices
    old = set(segs_of(orthanc, series_uid))
    status, body = put_label(live, series_uid, path, {"annotated_slices": slices})
    assert status == 200, body
    (seg_uid,) = set(segs_of(orthanc, series_uid)) - old
    (seg,) = orthanc.retrieve(pacs[RAW]["study"], seg_uid)
    assert seg_slices(seg, affine) == slices
    decoded = decode_seg(seg)
    assert set(decoded["names"].values()) <= set(LABELS)
    live.wait_until_in_bank(series_uid)
    live.wait_bank_idle()
    entry = live.manifest()["images"][series_uid]
    assert entry["entries"] == len(slices) and entry["source"]["annotation"]["slices"] == slices, entry
    assert live.bank()["partial_annotations"][series_uid]["how"] == "params annotated_slices"


# ---------------------------------------------------------------------------------------------
# OHIF on a folder datastore (issue 12): the same PACS for OHIF's images, the labels as NIfTI


def viewer_grid(affine: np.ndarray, shape) -> dict:
    """What the panel sends as params.ohif_grid: cornerstone's volume (dimensions, spacing, LPS
    origin, row/column/slice directions) of the series ITK converts to ``affine`` (the browser test
    checks the panel's own against the same affine)."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    return {"dimensions": [int(s) for s in shape], "spacing": spacing.tolist(), "origin": lps[:3, 3].tolist(),
            "direction": (lps[:3, :3] / spacing).T.ravel().tolist()}


def reoriented(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same scan stored in another voxel order: axes 0 and 1 swapped, then axis 0 reversed."""
    swap = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    data, affine = data.transpose(1, 0, 2), affine @ swap
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, data.shape[0] - 1
    return np.ascontiguousarray(data[::-1]), affine @ flip


@pytest.fixture(scope="module")
def local(pacs, orthanc, models_dir, dw_tmp):
    """The app on a folder: the PACS's three scans as NIfTI named by their SeriesInstanceUID (one of
    them stored in another voxel order than OHIF's), the seeded one labelled; OHIF reads the PACS."""
    folder = dw_tmp / "local-datastore"
    (folder / "labels" / "final").mkdir(parents=True)
    for case in CASES:
        data, affine = chaos(case, "image")
        if case == RAW:
            data, affine = reoriented(data, affine)
        nib.save(nib.Nifti1Image(data, affine), folder / f"{uid(pacs, case)}.nii.gz")
    label, affine = chaos(SEEDED, "label")
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), folder / "labels" / "final" / f"{uid(pacs, SEEDED)}.nii.gz")
    srv = Server(folder, models_dir, dw_tmp / "local.log",
                 extra=[("labels", ",".join(f"{n}={v}" for n, v in LABELS.items())), ("bank.augmentations_per_slice", "0"),
                        ("ohif_dicomweb", orthanc.dicomweb)]).start()
    srv.wait_ready(READY_TIMEOUT)
    yield srv
    srv.stop()


@dicomweb_test
def test_ohif_on_a_folder_datastore_reads_the_pacs_and_saves_nifti_final_labels(local, pacs, orthanc, dw_tmp):
    """OHIF's requests as the patched panel makes them, on a folder datastore: the study list through
    the app's DICOMweb proxy (-c ohif_dicomweb), Run answered on the viewer's grid, Save's label.bin
    stored as a NIfTI final label on the image's own grid (stored in another voxel order), checked
    like any upload, and the bank grows; a grid that is not the image's is refused, nothing stored."""
    from monailabel.client.client import MONAILabelUtils

    before = local.wait_bank_idle()
    assert before["images"] == 1
    series_uid = uid(pacs, RAW)
    # the study list and the series' metadata, as OHIF asks for them (query strings kept)
    status, body, _, _ = MONAILabelUtils.http_method("GET", local.url, "/proxy/dicom/qido/studies?limit=101&offset=0")
    assert status == 200, body
    studies = {s["0020000D"]["Value"][0] for s in json.loads(body)}
    assert studies == {pacs[c]["study"] for c in CASES}
    status, body, _, _ = MONAILabelUtils.http_method("GET", local.url, f"/proxy/dicom/qido/series?SeriesInstanceUID={series_uid}")
    assert status == 200 and json.loads(body)[0]["0020000D"]["Value"] == [pacs[RAW]["study"]], body
    status, body, _, _ = MONAILabelUtils.http_method(
        "GET", local.url, f"/proxy/dicom/wado/studies/{pacs[RAW]['study']}/series/{series_uid}/metadata")
    assert status == 200 and len(json.loads(body)) == len(pacs[RAW]["datasets"]), body[:300]

    ohif_affine = pacs[RAW]["affine"]  # the series as OHIF and ITK lay it out
    truth, _ = chaos(RAW, "label")
    grid = viewer_grid(ohif_affine, truth.shape)
    image = nib.load(local.studies / f"{series_uid}.nii.gz")
    assert not np.allclose(image.affine, ohif_affine, atol=1)  # stored in another voxel order than the viewer's

    # Run: the answer comes on the viewer's grid, the same labels as on the image's own grid
    status, form, files, _ = MONAILabelUtils.http_multipart(
        "POST", local.url, f"/infer/fewshot?image={series_uid}&output=all",
        {"params": json.dumps(dict(OHIF_INFER, ohif_grid=grid))}, {})
    assert status == 200, form
    (nrrd_bytes,) = files.values()
    header, _, raw = nrrd_bytes.partition(b"\n\n")
    assert b"sizes: " + " ".join(map(str, truth.shape)).encode() in header, header
    shown = np.frombuffer(raw, np.uint16).reshape(truth.shape, order="F")
    on_image = local.client().infer("fewshot", series_uid, {})[0]
    own = np.asarray(nib.load(on_image).dataobj)
    assert np.array_equal(reoriented(shown, ohif_affine)[0], own)

    # Save: the viewer's labelmap (segments numbered as this OHIF build does, alphabetical, background 1)
    ohif_numbers = {name: i + 1 for i, name in enumerate(sorted({"background", *LABELS}))}
    painted = np.zeros(truth.shape, np.uint8)
    for name, value in LABELS.items():
        painted[truth == value] = ohif_numbers[name]
    folder = dw_tmp / "ohif-local"
    folder.mkdir()
    (folder / "label.bin").write_bytes(painted.ravel(order="F").tobytes())
    label_info = [{"name": n, "segmentIndex": ohif_numbers[n]} for n in LABELS if (truth == LABELS[n]).any()]
    final = local.studies / "labels" / "final" / f"{series_uid}.nii.gz"

    # refused, nothing stored: no grid; a grid 5 mm off the image's; a raw label of the wrong size
    shifted = dict(grid, origin=[grid["origin"][0] + 5.0, *grid["origin"][1:]])
    for params, expected in (({"label_info": label_info}, "needs params.ohif_grid"),
                             ({"label_info": label_info, "ohif_grid": shifted}, "does not lie on the image's voxel grid"),
                             ({"label_info": label_info, "ohif_grid": dict(grid, dimensions=[*truth.shape[:2], truth.shape[2] + 1])}, "bytes")):
        status, body = put_label(local, series_uid, folder / "label.bin", params)
        assert status == 422 and expected in body, (status, body)
        assert not final.exists()

    status, body = put_label(local, series_uid, folder / "label.bin", {"label_info": label_info, "ohif_grid": grid})
    assert status == 200, body
    stored = nib.load(final)
    assert np.allclose(stored.affine, image.affine) and stored.shape == image.shape
    assert np.array_equal(np.asarray(stored.dataobj), reoriented(truth.astype(np.uint8), ohif_affine)[0])
    index = json.loads((local.studies / "datastore_v2.json").read_text())
    assert "ohif_grid" not in index["objects"][series_uid]["labels"]["final"]["info"]
    grown = local.wait_bank_idle()
    assert grown["images"] == before["images"] + 1 and series_uid in grown["image_ids"]
    # Next study: the app names the image (its SeriesInstanceUID); the panel finds its study on the PACS
    assert local.client().next_sample("bank_coverage", {})["id"] == uid(pacs, INFERRED)


# ---------------------------------------------------------------------------------------------
# without a server


def test_ohif_label_info_maps_painted_segments_by_name(tmp_path):
    """OHIF paints segment i (its position in /info's labels) with value i; with a gap in the
    configured values the stored label must hold the configured ones."""
    import sys

    from test_app_server import APP

    sys.path.insert(0, str(APP))  # the app's lib package, imported as MONAI Label imports it
    try:
        from fastapi import HTTPException

        from lib.labels import client_segments, value_table
        from lib.validation import UploadValidator
    finally:
        sys.path.remove(str(APP))
        for name in [m for m in sys.modules if m == "lib" or m.startswith("lib.")]:
            del sys.modules[name]
    label_map = {"liver": 1, "spleen": 4, "gallbladder": 6}
    info_labels = ["background", *label_map]  # /info's top-level list, by value
    segments = client_segments({"label_info": ohif_label_info(info_labels)})
    assert segments == {1: "liver", 2: "spleen", 3: "gallbladder"}
    painted = np.zeros((4, 4, 4), np.uint8)
    painted[0], painted[1], painted[2] = 1, 2, 3
    table = value_table(painted, segments, label_map, True, "label")
    assert table[painted].tolist() == np.select([painted == 1, painted == 2, painted == 3], [1, 4, 6], 0).tolist()
    # Through the validator, as the datastores call it: the stored copy holds configured values.
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), affine), tmp_path / "image.nii.gz")
    nib.save(nib.Nifti1Image(painted, affine), tmp_path / "label.nii.gz")
    validator = UploadValidator(lambda: sorted(label_map.values()), lambda: label_map)
    stored = validator.check_label("x", str(tmp_path / "image.nii.gz"), str(tmp_path / "label.nii.gz"), segments)
    assert stored != str(tmp_path / "label.nii.gz")
    assert sorted(np.unique(values(Path(stored))).tolist()) == [0, 1, 4, 6]
    # Slicer's label_info still wins when present; none: None (values taken as they are); a
    # label_info that is neither client's list of segments: 422 (issue 13), never a guess.
    assert client_segments({"label_info": [{"name": "liver", "idx": 1}]}) == ["liver"]
    assert client_segments({}) is None and client_segments({"label_info": []}) is None
    for junk in ([{"name": "liver"}], "liver", {"name": "liver", "idx": 1}, [{"name": "liver", "idx": 1}, 7]):
        with pytest.raises(HTTPException) as refused:
            client_segments({"label_info": junk})
        assert refused.value.status_code == 422
    with pytest.raises(HTTPException) as clash:
        client_segments({"label_info": [{"name": "liver", "segmentIndex": 1}, {"name": "spleen", "segmentIndex": 1}]})
    assert clash.value.status_code == 422
