"""Hostile requests against a real server on loopback (issue 16): temporary files, unbounded client
strings, NIfTI geometry headers that disagree, data after a label's voxels, case variants of the
reserved tags.

One server (preset random-tiny, conftest's ``sample_server``, shared with test_app_reliability)
serves the module on a copy of the committed sample datastore, so nothing here needs ../shared/data.
Its temporary folder (TMPDIR) is a folder of the test's own, its session archives are capped low
(1 MB, 20 files) through ``-c``, and warm-up is off so nothing writes to the datastore in the
background. Each test hashes the datastore (bank included) and lists the temporary folder before its
refused requests and checks both are unchanged after them.
"""
from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from app_harness import Server, Unchanged
from app_harness import expect as check_answers
from conftest import SAMPLE_SERVER_LIMITS, release_sample_server

IMAGE = "phantom_04"  # unlabelled in the sample datastore
MAX_UNPACKED_MB, MAX_FILES = SAMPLE_SERVER_LIMITS["session_max_unpacked_mb"], SAMPLE_SERVER_LIMITS["session_max_files"]

pytestmark = [pytest.mark.server, pytest.mark.slow]


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def app_tmp(sample_server_tmp) -> Path:
    """The shared server's folder: its session folder is ``sessions`` here."""
    return sample_server_tmp


@pytest.fixture(scope="module")
def server(request, sample_server):
    yield sample_server
    release_sample_server(request, sample_server)


def expect(server: Server, cases) -> None:
    """``cases`` as ``app_harness.expect``; no answer may name the server's temporary folder."""
    check_answers(server, cases, hide_temp_path=True)


def image_nifti(server: Server) -> nib.Nifti1Image:
    return nib.load(server.studies / f"{IMAGE}.nii.gz")


def label_values(img: nib.Nifti1Image) -> np.ndarray:
    values = np.zeros(img.shape, np.uint8)
    values[20:40, 20:40, 5:15] = 1
    return values


def save_label_file(path: Path, img: nib.Nifti1Image, qform: np.ndarray | None = None) -> Path:
    """A label on the image's grid, written as viewers write one (uint8, the image's geometry);
    ``qform``: a different qform (the sform stays the image's)."""
    out = nib.Nifti1Image(label_values(img), img.affine)
    out.set_sform(img.affine, code=1)
    out.set_qform(img.affine if qform is None else qform, code=1)
    nib.save(out, path)
    return path


# ---------------------------------------------------------------------------------------------
# 1. temporary files


def test_infer_uploads_leave_no_temporary_file_and_no_path_in_messages(server, app_tmp):
    snapshot = Unchanged(server)
    bad = app_tmp / "infer"
    bad.mkdir()
    garbage = bad / "garbage.nii.gz"
    garbage.write_bytes(b"not a volume" * 400_000)  # 4.8 MB, refused after it was stored
    flat = bad / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((30, 30, 1), np.float32), np.eye(4)), flat)
    good = str(server.studies / f"{IMAGE}.nii.gz")
    expect(server, [
        # Refused from its header, before the engine reads it (issue 13: the upload's size is checked there).
        ("POST", "/infer/fewshot", {"file": str(garbage)}, None, 422, "the uploaded image is not a valid NIfTI file"),
        ("POST", "/infer/fewshot", {"file": str(flat)}, None, 422, "2D image stored as 3D"),
        ("POST", "/infer/fewshot?output=dicom_seg", {"file": good}, None, 400, "output=dicom_seg is not served"),
        ("POST", "/infer/fewshot", {"file": good, "label": good}, None, 400, "takes no label input"),
        ("POST", "/infer/fewshot", {"file": good}, {"params": json.dumps({"top_k": 0})}, 400, "top_k"),
        ("POST", "/infer/fewshot", None, None, 400, "no image"),  # stock: 500
    ])
    # A successful inference on an upload removes it too, once the response is sent.
    label_file, result = server.client().infer("fewshot", "", {"matching": False, "top_k": 4, "memories": 1}, file=good)
    assert nib.load(label_file).shape == image_nifti(server).shape
    snapshot.check()


def test_session_archives_over_the_caps_get_413_and_leave_nothing(server, app_tmp):
    snapshot = Unchanged(server)
    sessions = app_tmp / "sessions"
    archives = app_tmp / "archives"
    archives.mkdir()
    zeros = b"\0" * ((MAX_UNPACKED_MB << 20) + 1)  # compresses to a few kB
    with zipfile.ZipFile(archives / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("series/slice_001.dcm", zeros)
    with zipfile.ZipFile(archives / "many.zip", "w") as zf:
        for i in range(MAX_FILES + 1):
            zf.writestr(f"series/slice_{i:03d}.dcm", b"dicom")
    with tarfile.open(archives / "bomb.tar.gz", "w:gz") as tf:
        member = tarfile.TarInfo("series/slice_001.dcm")
        member.size = len(zeros)
        tf.addfile(member, io.BytesIO(zeros))
    with zipfile.ZipFile(archives / "fits.zip", "w") as zf:
        for i in range(MAX_FILES):
            zf.writestr(f"series/slice_{i:03d}.dcm", b"dicom")
    expect(server, [
        ("PUT", "/session/?uncompress=true", {"files": str(archives / "bomb.zip")}, {}, 413, "unpacks to more than 1 MB"),
        ("PUT", "/session/?uncompress=true", {"files": str(archives / "bomb.tar.gz")}, {}, 413, "unpacks to more than 1 MB"),
        ("PUT", "/session/?uncompress=true", {"files": str(archives / "many.zip")}, {}, 413, f"more than {MAX_FILES} files"),
    ])
    assert not sessions.exists() or not any(sessions.iterdir())
    snapshot.check()
    # At the caps it is a session.
    status, body = server.request("PUT", "/session/?uncompress=true", files={"files": str(archives / "fits.zip")}, fields={})
    assert status == 200, body
    session_id = json.loads(body)["session_id"]
    assert len(list((sessions / session_id).rglob("*.dcm"))) == MAX_FILES
    assert server.request("DELETE", f"/session/{session_id}")[0] == 200
    snapshot.check()


# ---------------------------------------------------------------------------------------------
# 2. client strings


def test_long_client_strings_are_refused_before_they_are_stored_or_logged(server):
    snapshot = Unchanged(server)
    log_size = server.log_path.stat().st_size
    huge = "x" * (1 << 20)
    name_long = "n" * 300
    text_long = "t" * 5000
    label = str(server.studies / "labels" / "final" / "phantom_01.nii.gz")
    expect(server, [
        ("POST", "/activelearning/random", None, {"client_id": huge}, 400, "params is"),
        ("POST", "/activelearning/random", None, {"client_id": name_long}, 400, "'client_id' is 300 characters long"),
        ("POST", "/activelearning/random", None, {"client_id": {"nested": "x"}}, 400, "client_id must be a string"),
        ("POST", f"/activelearning/{name_long}", None, {}, 404, "no strategy"),  # stock: 500
        ("PUT", "/datastore/image/info?image=phantom_01", {}, {"info": json.dumps({"note": text_long})}, 400, "at most 4096"),
        ("PUT", "/datastore/image/info?image=phantom_01", {}, {"info": json.dumps({name_long: 1})}, 400, "longer than 255"),
        ("PUT", "/datastore/label/info?label=phantom_01&tag=final", {}, {"info": json.dumps({"client_id": name_long})}, 400, "at most 255"),
        ("PUT", "/datastore/label?image=phantom_01", {"label": label}, {"params": json.dumps({"client_id": name_long})}, 400, "at most 255"),
        ("PUT", "/datastore/label?image=phantom_01", {"label": label},
         {"params": json.dumps({"label_info": [{"name": name_long, "idx": 1}]})}, 400, "'name' is 300 characters long"),
        ("PUT", f"/datastore/label?image={'i' * 300}", {"label": label}, {}, 400, "longer than 255"),
        ("POST", "/infer/fewshot?image=phantom_01", {}, {"params": json.dumps({f"k{i}": "v" * 4000 for i in range(20)})}, 400, "bytes of JSON"),
        ("POST", "/batch/infer/fewshot", None, {"client_id": name_long}, 400, "at most 255"),
    ])
    snapshot.check()
    assert server.log_path.stat().st_size - log_size < 64 * 1024, "client strings reached the log"
    # Info is merged into what the index keeps: each request is bounded and so is the sum.
    chunk = {f"note_{i}": "n" * 4000 for i in range(10)}  # 40 kB
    status, body = server.request("PUT", "/datastore/image/info?image=phantom_02", files={}, fields={"info": json.dumps(chunk)})
    assert status == 200, body
    more = {f"more_{i}": "m" * 4000 for i in range(10)}
    status, body = server.request("PUT", "/datastore/image/info?image=phantom_02", files={}, fields={"info": json.dumps(more)})
    assert status == 400 and "would grow to" in body, body
    info = server.client().datastore()["objects"]["phantom_02"]["image"]["info"]
    assert "note_0" in info and "more_0" not in info
    # A client id of ordinary length is stored as before.
    status, body = server.request("POST", "/activelearning/random", body={"client_id": "slicer-7"})
    assert status == 200, body
    info = server.client().datastore()["objects"][json.loads(body)["id"]]["image"]["info"]
    assert info["strategy"]["random"]["client_id"] == "slicer-7"


# ---------------------------------------------------------------------------------------------
# 3. geometry headers, 4. data after the voxels


def test_nifti_whose_qform_and_sform_disagree_is_refused(server, app_tmp):
    snapshot = Unchanged(server)
    img = image_nifti(server)
    folder = app_tmp / "geometry"
    folder.mkdir()
    off = img.affine.copy()
    off[:3, 3] += [0.0, 0.0, 40.0]
    label = save_label_file(folder / "label_qform_40mm.nii.gz", img, qform=off)
    image = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine)
    image.set_sform(img.affine, code=1)
    image.set_qform(off, code=1)
    nib.save(image, folder / "image_qform_40mm.nii.gz")
    expect(server, [
        ("PUT", f"/datastore/label?image={IMAGE}", {"label": str(label)}, None, 422, "place its voxels up to 40.0 mm apart"),
        ("PUT", "/datastore/image?image=new_case", {"file": str(folder / "image_qform_40mm.nii.gz")}, None, 422, "qform"),
    ])
    snapshot.check()


def test_label_with_data_after_its_voxels_is_refused_without_reading_it_all(server, app_tmp):
    import nrrd

    snapshot = Unchanged(server)
    img = image_nifti(server)
    folder = app_tmp / "trailing"
    folder.mkdir()
    clean = save_label_file(folder / "clean.nii.gz", img)
    packed = clean.read_bytes()
    (folder / "zeros_after.nii.gz").write_bytes(packed + b"\0" * (20 << 20))  # a valid stream, then 20 MB
    (folder / "more_in_stream.nii.gz").write_bytes(gzip.compress(gzip.decompress(packed) + b"\0" * (1 << 20)))
    plain = folder / "plain_after.nii"
    nib.save(nib.load(clean), plain)
    plain.write_bytes(plain.read_bytes() + b"junk")
    # An NRRD label for the image's grid whose gzip data decodes to 100 MB (pynrrd would hold it all).
    header = {"type": "uint8", "dimension": 3, "sizes": list(img.shape), "encoding": "gzip", "endian": "little",
              "space": "left-posterior-superior", "space directions": np.diag([-1.0, -1.0, 1.0]) @ img.affine[:3, :3],
              "space origin": (np.diag([-1.0, -1.0, 1.0]) @ img.affine[:3, 3])}
    nrrd.write(str(folder / "fits.nrrd"), label_values(img), header, index_order="F")
    head = (folder / "fits.nrrd").read_bytes().split(b"\n\n", 1)[0] + b"\n\n"
    (folder / "bomb.nrrd").write_bytes(head + gzip.compress(b"\0" * (100 << 20)))
    # A NIfTI header announcing far more voxels than the image has.
    big = folder / "big.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((720, 640, 20), np.uint8), img.affine), big)
    selector = f"/datastore/label?image={IMAGE}"
    started = time.perf_counter()
    expect(server, [
        ("PUT", selector, {"label": str(folder / "zeros_after.nii.gz")}, None, 422, "20971520 bytes follow the end of its compressed voxel data"),
        ("PUT", selector, {"label": str(folder / "more_in_stream.nii.gz")}, None, 422, "holds more than"),
        ("PUT", selector, {"label": str(plain)}, None, 422, "4 bytes follow its voxel data"),
        ("PUT", selector, {"label": str(folder / "bomb.nrrd")}, None, 422, "holds more than"),
        ("PUT", selector, {"label": str(big)}, None, 422, "does not match image shape"),
    ])
    assert time.perf_counter() - started < 30
    snapshot.check()
    # The same label without what followed it is stored byte for byte, as before.
    response = server.client().save_label(IMAGE, str(clean), tag="final")
    assert response["label"] == IMAGE
    assert (server.studies / "labels" / "final" / f"{IMAGE}.nii.gz").read_bytes() == packed
    assert server.request("DELETE", f"/datastore/label?id={IMAGE}&tag=final")[0] == 200
    server.wait_bank_idle()


# ---------------------------------------------------------------------------------------------
# 5. reserved tags


def test_case_variants_of_reserved_tags_are_refused(server, app_tmp):
    snapshot = Unchanged(server)
    label = str(save_label_file(app_tmp / "tag_label.nii.gz", image_nifti(server)))
    cases = [("PUT", f"/datastore/label?image={IMAGE}&tag={tag}", {"label": label}, None, 400, "only by case")
             for tag in ("Final", "FINAL", "Original")]
    cases += [
        ("POST", f"/infer/fewshot?image={IMAGE}", {}, {"params": json.dumps({"save_label": True, "label_tag": "Final"})}, 400, "only by case"),
        ("POST", "/batch/infer/fewshot", None, {"save_label": True, "label_tag": "fINAL"}, 400, "only by case"),
        ("PUT", "/datastore/label/info?label=phantom_01&tag=Final", {}, {"info": "{}"}, 400, "only by case"),
    ]
    expect(server, cases)
    labels = {p.name.lower() for p in (server.studies / "labels").iterdir()}
    assert labels <= {"final", "original"} and not (server.studies / "labels" / "Final").exists()
    snapshot.check()
