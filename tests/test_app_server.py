"""The MONAI Label app, end to end: a real server on loopback driven by MONAI Label's own client.

One server (preset random-tiny, tiny random networks) serves the whole module on a datastore of
four CHAOS T2 volumes copied from ../shared/data (two with final labels). Its label names come
from the datastore's ``labels.yaml``, with a gap in the values (gallbladder is 6, nothing is 5) and
one value (7) that only a saved label holds, as real label maps have. The tests run in file order
and share its state: the bank grows as labels are saved. The last server test kills the server
with SIGKILL while an ingestion is certainly in flight (a test-only pause before the commit) and
checks the next start-up repairs the bank while reloading, not rebuilding, everything else.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from app_harness import APP, INGEST_TIMEOUT, PROJECT, STARTUP_TIMEOUT, Server, expect, tree_digest
from project_scripts import load_script

SHARED_DATA = Path(os.environ.get("FEWSHOT_SHARED_DATA", PROJECT.parent / "shared" / "data"))
CHAOS = SHARED_DATA / "chaos-t2"
LABELLED = ["1", "2"]
UNLABELLED = ["3", "5"]
# From the datastore's labels.yaml. gallbladder has no example anywhere: inference must skip it
# with a message, not fail. Value 5 is unused; 7 is found only in image_2's saved label.
LABELS_YAML = {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4, "gallbladder": 6}
FOUND = 7
INFO_LABELS = {"background": 0, **LABELS_YAML, str(FOUND): FOUND}
IN_BANK = {"liver", "right_kidney", "left_kidney", "spleen", str(FOUND)}
SLOW_ID = "slow_case"  # its ingestions pause before the commit (test hook)
RELEASE_FILE = "release-paused-ingestion"  # its existence ends the pause early (engine_host.TEST_RELEASE_ENV)
INGEST_PAUSE = 60.0  # long enough for an inference inside it on a loaded machine (17.6 s seen at load 14); tests end it early


def server_test(fn):
    """A test that drives the real server on the real data."""
    return pytest.mark.server(pytest.mark.shared_data(pytest.mark.slow(fn)))


# ---------------------------------------------------------------------------------------------
# helpers


def image_id(case: str) -> str:
    return f"image_{case}"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def chaos_label(case: str) -> np.ndarray:
    return np.asarray(nib.load(CHAOS / f"label_{case}.nii.gz").dataobj).astype(np.uint8)


def with_found_value(label: np.ndarray) -> np.ndarray:
    """The upper half (in z) of the spleen relabelled 7: a value only saved labels hold."""
    out = label.copy()
    z = np.nonzero((label == 4).any(axis=(0, 1)))[0]
    upper = np.zeros_like(label, dtype=bool)
    upper[:, :, z[len(z) // 2]:] = True
    out[(label == 4) & upper] = FOUND
    return out


def save_nifti(values: np.ndarray, case: str, path: Path) -> Path:
    ref = nib.load(CHAOS / f"label_{case}.nii.gz")
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    nib.save(nib.Nifti1Image(values.astype(np.uint8), ref.affine, header), path)
    return path


def read_label(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def save_label(server: Server, case_id: str, label: Path, params: dict | None = None) -> tuple[dict, float]:
    start = time.perf_counter()
    response = server.client().save_label(case_id, str(label), params=params)
    return response, time.perf_counter() - start


def timed_get_info(server: Server) -> float:
    start = time.perf_counter()
    server.request("GET", "/info/")
    return time.perf_counter() - start


def quote(text: str) -> str:
    from urllib.parse import quote_plus

    return quote_plus(text)


def supports_used(result: dict) -> set[str]:
    return {s["image_id"] for per_label in result["provenance"].values() for z in per_label["slices"].values() for s in z["supports"]}


def slicer_import_names(label_names: dict) -> list[str]:
    """3D Slicer's plugin (onClickSegmentation -> updateSegmentationMask): names sorted by value,
    background dropped; ImportLabelmapToSegmentationNode puts voxel value i+1 into the i-th."""
    return [n for n, _ in sorted(label_names.items(), key=lambda kv: kv[1]) if n != "background"]


def slicer_export(values: np.ndarray, info_labels: list[str], label_map: dict) -> tuple[np.ndarray, list[dict]]:
    """What Slicer's "Submit Label" uploads for a segmentation whose segments were created from
    /info's labels (initSample): the non-background segments exported as values 1..K in segment
    order, and label_info with idx = position among all segments + 1."""
    exported = np.zeros_like(values)
    label_info = []
    k = 0
    for idx, name in enumerate(info_labels):
        if name == "background":
            continue
        k += 1
        exported[values == label_map[name]] = k
        label_info.append({"name": name, "idx": idx + 1})
    return exported, label_info


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def app_tmp(tmp_path_factory) -> Path:
    if not CHAOS.is_dir() or not any(CHAOS.glob("image_*")):
        pytest.skip(f"real data {CHAOS} is absent (it lives in ../shared/data beside the project)")
    return tmp_path_factory.mktemp("app")


@pytest.fixture(scope="module")
def labels_with_found_value(app_tmp) -> Path:
    return save_nifti(with_found_value(chaos_label("2")), "2", app_tmp / "label_2_found.nii.gz")


@pytest.fixture(scope="module")
def datastore(app_tmp, labels_with_found_value) -> Path:
    root = app_tmp / "datastore"
    (root / "labels" / "final").mkdir(parents=True)
    for case in LABELLED + UNLABELLED:
        shutil.copyfile(CHAOS / f"image_{case}.nii.gz", root / f"image_{case}.nii.gz")
    shutil.copyfile(CHAOS / "label_1.nii.gz", root / "labels" / "final" / "image_1.nii.gz")
    shutil.copyfile(labels_with_found_value, root / "labels" / "final" / "image_2.nii.gz")
    (root / "labels.yaml").write_text("".join(f"{n}: {v}\n" for n, v in LABELS_YAML.items()))
    return root


@pytest.fixture(scope="module")
def foundation_start(app_tmp, models_dir):
    """Started first so that its (slow) imports overlap the main server's start-up."""
    studies = app_tmp / "foundation-datastore"
    studies.mkdir()
    empty_models = app_tmp / "no-weights"
    empty_models.mkdir()
    server = Server(studies, empty_models, app_tmp / "foundation.log", preset="foundation",
                    extra=[("labels", "liver=1,spleen=4")]).start()
    yield server
    server.stop()


def server_env(app_tmp: Path) -> dict:
    return {"MONAI_LABEL_SESSION_PATH": str(app_tmp / "sessions")}


@pytest.fixture(scope="module")
def server(foundation_start, datastore, models_dir, app_tmp):
    # Fewer bank entries per image (no augmented copies) keep ingestion quick; it also exercises
    # a dotted engine option passed through -c.
    env = dict(server_env(app_tmp), FEWSHOT_APP_TEST_INGEST_PAUSE=f"{SLOW_ID}={INGEST_PAUSE}",
               FEWSHOT_APP_TEST_INGEST_RELEASE=str(app_tmp / RELEASE_FILE))
    srv = Server(datastore, models_dir, app_tmp / "server.log", extra=[("bank.augmentations_per_slice", "0")], env=env).start()
    srv.wait_ready()
    yield srv
    srv.stop()


# ---------------------------------------------------------------------------------------------
# tests, in the order a user's session would run


@server_test
def test_info_lists_task_strategy_bank_and_config(server):
    bank = server.wait_bank_idle()
    info = server.client().info()
    assert "config" not in info  # Slicer refuses a top-level config
    # One task, named for every preset; its old name is an alias (see the next test), not a second model.
    assert set(info["models"]) == {"fewshot"} and info["model_aliases"] == {"fewshot_sam2": "fewshot"}
    assert info["preset"] == "random-tiny"
    model = info["models"]["fewshot"]
    assert model["type"] == "segmentation" and model["dimension"] == 3
    # Names from the datastore's labels.yaml, plus the value found in a saved label.
    assert model["labels"] == INFO_LABELS
    # Top-level labels by value, background first: Slicer creates one segment per name, OHIF's
    # panel drops the first entry.
    assert info["labels"] == [n for n, _ in sorted(INFO_LABELS.items(), key=lambda kv: kv[1])]
    assert set(model["config"]) >= {"top_k", "matching", "memories", "device"}
    assert "random-tiny" in model["description"] and "RANDOM weights" in model["description"]
    assert {"bank_coverage", "random", "first"} <= set(info["strategies"])
    assert bank["images"] == len(LABELLED) and bank["slices"] > 0
    assert set(bank["per_label"]) == IN_BANK
    assert bank["augmented_slices"] == 0  # -c bank.augmentations_per_slice 0 reached the engine
    assert model["transfer"] == {"type": "sam2", "image_size": 128}  # the size SAM 2 runs at, as resolved
    log = server.log()
    assert "few-shot preset 'random-tiny'" in log and "weights: sam2-random-tiny" in log
    assert "SAM 2 input size 128 on cpu" in log


@server_test
def test_foundation_without_weights_fails_with_one_clear_message(foundation_start):
    rc = foundation_start.proc.wait(STARTUP_TIMEOUT)
    log = foundation_start.log()
    assert rc != 0
    assert "Traceback" not in log
    errors = [line for line in log.splitlines() if line.startswith("ERROR: few-shot app cannot start")]
    assert len(errors) == 1, log[-3000:]
    assert log.count("few-shot app cannot start") == 1, log[-3000:]  # not repeated by the console log (issue 13)
    # Short, and names both ways forward: fetch the weights, or a preset that needs none.
    assert len(errors[0]) < 600, errors[0]
    assert "python -m fewshot models download" in errors[0] and "-c preset classic" in errors[0]
    assert "dinov2-vits14, lpips-alex, sam2.1-hiera-tiny" in errors[0]


@server_test
def test_infer_unlabelled_image_returns_label_with_its_geometry(server, datastore):
    server.wait_bank_idle()
    case = image_id(UNLABELLED[0])
    params = {"matching": False, "top_k": 8, "memories": 2}
    label_file, result = server.client().infer("fewshot", case, params)
    out, image = nib.load(label_file), nib.load(datastore / f"{case}.nii.gz")
    assert out.shape == image.shape
    assert np.allclose(out.affine, image.affine, atol=1e-4)
    values = set(np.unique(np.asarray(out.dataobj)).tolist())
    assert values <= set(INFO_LABELS.values())
    assert result["options"] == {"top_k": 8, "matching": False, "memories": 2}
    assert set(result["segmented"]) == IN_BANK
    assert "gallbladder" in result["skipped"] and "gallbladder: skipped" in result["message"]
    assert result["latencies"]["total"] > 0
    used = supports_used(result)
    assert used and used <= {image_id(c) for c in LABELLED}
    # 3D Slicer imports voxel value i+1 into the i-th name of label_names (sorted by value, no
    # background): every structure must land in the segment of its own name.
    names = slicer_import_names(result["label_names"])
    for name, value in INFO_LABELS.items():
        if name != "background":
            assert names.index(name) + 1 == value, (name, value, names)
    assert values <= set(result["label_names"].values())
    assert result["centroids"] == {}  # OHIF's panel reads this key


@server_test
def test_the_tasks_old_name_still_segments(server, datastore):
    """Clients written against ``fewshot_sam2`` (its name before it ran under presets without SAM 2)
    get the same task: the same label as under ``fewshot``, through /infer and /batch/infer alike."""
    server.wait_bank_idle()
    case = image_id(UNLABELLED[0])
    params = {"matching": False, "top_k": 5, "memories": 1}  # not another test's options: computed here
    new_file, new = server.client().infer("fewshot", case, params)
    old_file, old = server.client().infer("fewshot_sam2", case, params)
    assert set(new["segmented"]) == IN_BANK and old["segmented"] == new["segmented"]
    assert old["timings"].get("reused") and not new["timings"].get("reused")  # one task, one engine: its result again
    assert np.array_equal(np.asarray(nib.load(old_file).dataobj), np.asarray(nib.load(new_file).dataobj))
    status, body = server.request("POST", "/batch/infer/fewshot_sam2", body={"save_label": True, "label_tag": "final"})
    assert status == 400 and "cannot be saved as the 'final' label" in body  # checked as the task's own request


@server_test
def test_infer_as_ohif_asks_returns_nrrd_with_the_image_geometry(server, datastore):
    import SimpleITK as sitk

    from fewshot.volume import read_volume

    case = image_id(UNLABELLED[0])
    # OHIF's MonaiLabelClient.infer sends exactly these.
    params = {"result_extension": ".nrrd", "result_dtype": "uint16", "result_compress": False, "restore_label_idx": False}
    label_file, result = server.client().infer("fewshot", case, params)
    assert label_file.endswith(".nrrd")
    header = (Path(label_file).read_bytes().split(b"\n\n", 1)[0]).decode()
    assert "type: uint16" in header and "encoding: raw" in header
    image, label = read_volume(datastore / f"{case}.nii.gz"), read_volume(label_file)  # the engine's reader
    assert label.shape == image.shape
    assert np.allclose(label.affine, image.affine, atol=1e-4)
    ref, out = sitk.ReadImage(str(datastore / f"{case}.nii.gz")), sitk.ReadImage(label_file)  # as Slicer reads it
    assert out.GetSize() == ref.GetSize()
    for a, b in ((out.GetOrigin(), ref.GetOrigin()), (out.GetSpacing(), ref.GetSpacing()), (out.GetDirection(), ref.GetDirection())):
        assert np.allclose(a, b, atol=1e-4)
    assert set(np.unique(sitk.GetArrayFromImage(out)).tolist()) <= set(INFO_LABELS.values())


@server_test
def test_bad_inputs_get_4xx_and_change_nothing_on_disk(server, datastore, app_tmp):
    server.wait_bank_idle()
    before, bank_before = tree_digest(datastore), server.bank()
    image = nib.load(datastore / "image_1.nii.gz")
    bad = app_tmp / "bad"
    bad.mkdir()
    (bad / "garbage.nii.gz").write_bytes(b"garbage")  # 7 bytes
    (bad / "notes.txt").write_text("not an image")
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), image.affine), bad / "wrong_shape.nii.gz")
    shifted = image.affine.copy()
    shifted[:3, 3] += 40.0
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), shifted), bad / "wrong_affine.nii.gz")
    values = chaos_label("1")
    values[values == 4] = 9
    save_nifti(values, "1", bad / "unknown_value.nii.gz")
    fractional = chaos_label("1").astype(np.float32)
    fractional[fractional == 4] = 1.5
    ref = nib.load(CHAOS / "label_1.nii.gz")
    nib.save(nib.Nifti1Image(fractional, ref.affine), bad / "fractional.nii.gz")
    escape_name = bad / "..\\..\\escape.nii.gz"  # a backslash is a plain character in a Linux file name
    shutil.copyfile(CHAOS / "image_8.nii.gz", escape_name)
    # Slicer-style upload naming a segment the app has no label for, painted.
    painted, label_info = slicer_export(chaos_label("1"), ["background", "liver", "Segment_1"], {"liver": 1, "Segment_1": 2})
    save_nifti(painted, "1", bad / "slicer_unknown_segment.nii.gz")
    # Archives whose member would overwrite image_1's final label (relative to the extraction folder).
    target = datastore / "labels" / "final" / "image_1.nii.gz"
    member = "../" * 40 + str(target).lstrip("/")
    with tarfile.open(bad / "evil.tar", "w") as tf:
        data = b"not a label"
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with zipfile.ZipFile(bad / "evil.zip", "w") as zf:
        zf.writestr(zipfile.ZipInfo(member), b"not a label")
    good_label = str(CHAOS / "label_3.nii.gz")
    # A valid label for image_1 that differs from the one it has: a wrongly accepted save shows.
    other = chaos_label("1")
    other[other == 2] = 0
    other_label_1 = str(save_nifti(other, "1", bad / "other_label_1.nii.gz"))
    final = "final"

    cases = [
        # (method, selector, files, form fields or JSON body, expected status, words in the message)
        ("PUT", "/datastore/label?image=no_such_image", {"label": good_label}, None, 404, "unknown image id"),
        ("PUT", f"/datastore/label?image={quote('../../etc/passwd')}", {"label": good_label}, None, 400, "invalid image id"),
        ("PUT", f"/datastore/label?image=image_3&tag={quote('../../outside')}", {"label": good_label}, None, 400, "invalid label tag"),
        ("PUT", "/datastore/label?image=image_1", {"label": str(bad / "wrong_shape.nii.gz")}, None, 422, "does not match image shape"),
        ("PUT", "/datastore/label?image=image_1", {"label": str(bad / "wrong_affine.nii.gz")}, None, 422, "affine"),
        # the stock server answers 200 to this one and overwrites image_1's final label
        ("PUT", "/datastore/label?image=image_1", {"label": str(bad / "garbage.nii.gz")}, None, 422, "not a valid NIfTI"),
        ("PUT", "/datastore/label?image=image_1", {"label": str(bad / "notes.txt")}, None, 415, "file type"),
        ("PUT", "/datastore/label?image=image_1", {"label": str(bad / "unknown_value.nii.gz")}, None, 422, "[9] are not among the configured labels"),
        ("PUT", "/datastore/label?image=image_1", {"label": str(bad / "fractional.nii.gz")}, None, 422, "fractional"),
        ("PUT", "/datastore/label?image=image_1", {"label": str(bad / "slicer_unknown_segment.nii.gz")},
         {"params": json.dumps({"label_info": label_info})}, 422, "['Segment_1'] are not labels of this app"),
        # params that are not a JSON object: stock writes the label, then answers 500
        *[("PUT", "/datastore/label?image=image_1", {"label": other_label_1}, {"params": p}, 400, "must be a JSON object")
          for p in ("[1]", '"x"', "5", "true", "[[1,2]]")],
        ("PUT", "/datastore/label?image=image_1", {"label": other_label_1}, {"params": "{not json"}, 400, "not valid JSON"),
        ("PUT", "/datastore/label?image=image_1", {"label": other_label_1}, {"params": '{"name": "x.nii.gz"}'}, 400, "may not set ['name']"),
        ("PUT", f"/datastore/image?image={quote('../escape')}", {"file": str(CHAOS / 'image_8.nii.gz')}, None, 400, "invalid image id"),
        ("PUT", f"/datastore/image?image={quote('new.nii.gz')}", {"file": str(CHAOS / 'image_8.nii.gz')}, None, 400, "contains a file extension"),
        ("PUT", "/datastore/", {"file": str(escape_name)}, None, 400, "invalid image id"),  # id from the upload's file name
        ("PUT", "/datastore/image?image=junk", {"file": str(bad / "garbage.nii.gz")}, None, 422, "not a valid NIfTI"),
        ("PUT", "/datastore/image?image=junk", {"file": str(CHAOS / 'image_8.nii.gz')}, {"params": "[1]"}, 400, "must be a JSON object"),
        ("PUT", "/datastore/image?image=junk", {"file": str(CHAOS / 'image_8.nii.gz')}, {"params": "{"}, 400, "not valid JSON"),
        # replacing a labelled image with a volume its final label does not fit
        ("PUT", "/datastore/image?image=image_1", {"file": str(CHAOS / 'image_8.nii.gz')}, None, 409, "does not fit the image's existing final label"),
        ("PUT", "/datastore/image/info?image=image_1", {}, {"info": "[1]"}, 400, "must be a JSON object"),
        ("PUT", "/datastore/image/info?image=image_1", {}, {"info": "{oops"}, 400, "not valid JSON"),
        ("PUT", "/datastore/image/info?image=image_1", {}, {"info": '{"id": "image_3"}'}, 400, "may not set ['id']"),
        ("PUT", "/datastore/label/info?label=image_1&tag=final", {}, {"info": '"x"'}, 400, "must be a JSON object"),
        ("PUT", "/datastore/updatelabelinfo?label=image_1&tag=final", {}, {"params": "{"}, 400, "not valid JSON"),
        ("POST", f"/infer/fewshot?image={quote('../../etc/passwd')}", None, None, 400, "invalid image id"),
        ("POST", f"/infer/fewshot?image={quote(str(CHAOS / 'image_8.nii.gz'))}", None, None, 400, "invalid image id"),
        ("POST", f"/infer/fewshot?image={quote('/tmp')}", None, None, 400, "invalid image id"),
        ("POST", "/infer/fewshot?image=no_such_image", None, None, 404, "unknown image id"),
        ("POST", "/infer/fewshot?image=image_3", {}, {"params": "{"}, 400, "not valid JSON"),
        ("POST", "/infer/fewshot?image=image_3", {}, {"params": json.dumps({"save_label": True, "label_tag": final})}, 400, "cannot be saved as the 'final' label"),
        ("POST", "/infer/fewshot?image=image_3", {}, {"params": json.dumps({"result_extension": ".mha"})}, 400, "result_extension"),
        ("POST", "/infer/fewshot?image=image_3&session_id=..", None, None, 400, "invalid session id"),
        ("POST", "/batch/infer/fewshot", None, {"save_label": True, "label_tag": final}, 400, "cannot be saved as the 'final' label"),
        ("POST", "/batch/infer/no_such_model", None, {}, 404, "unknown model"),
        ("POST", "/train/anything", None, {}, 404, "no training task"),
        ("POST", "/scoring/anything", None, {}, 404, "no scoring method"),
        ("GET", "/session/..?update_ts=true", None, None, 400, "invalid session id"),
        ("DELETE", "/session/..", None, None, 400, "invalid session id"),
        ("PUT", "/session/?uncompress=true", {"files": str(bad / "evil.tar")}, {}, 400, "outside the session folder"),
        ("PUT", "/session/?uncompress=true", {"files": str(bad / "evil.zip")}, {}, 400, "outside the session folder"),
        ("DELETE", f"/datastore/label?id={quote('../labels/final/image_1')}&tag=final", None, None, 400, "invalid image id"),
        ("DELETE", "/datastore/label?id=image_3&tag=final", None, None, 404, "has no 'final' label"),
        ("DELETE", f"/datastore/image?id={quote('../../x')}", None, None, 400, "invalid image id"),
    ]
    expect(server, cases)
    time.sleep(1.0)  # let a wrongly queued ingestion or file event show up, if there were one
    server.wait_bank_idle()
    assert tree_digest(datastore) == before
    after = server.bank()
    assert (after["images"], after["slices"]) == (bank_before["images"], bank_before["slices"])
    assert not list(datastore.parent.glob("escape*")) and not (datastore / "labels" / "outside").exists()
    sessions = app_tmp / "sessions"
    assert not sessions.exists() or not any(sessions.iterdir())


@server_test
def test_strategy_proposes_unlabelled_images_only(server):
    server.wait_bank_idle()  # includes the background warm-up of the strategy's embeddings
    client = server.client()
    unlabelled = {image_id(c) for c in UNLABELLED}
    for strategy in ("bank_coverage", "bank_coverage", "random", "first"):
        proposal = client.next_sample(strategy, {})
        assert proposal["id"] in unlabelled, (strategy, proposal)
    proposal = client.next_sample("bank_coverage", {})
    assert proposal["reason"] == "farthest from the support bank" and proposal["score"] > 0
    assert "warming" not in proposal
    assert "bank_coverage: cached slice embeddings" in server.log()  # computed in the background


@server_test
def test_saving_a_label_grows_the_bank_once(server, datastore):
    before = server.wait_bank_idle()
    case = image_id(UNLABELLED[0])
    # uint8, as viewers export labels (the CHAOS files are float64, 8x the bytes to decompress)
    label = save_nifti(chaos_label(UNLABELLED[0]), UNLABELLED[0], datastore.parent / f"label_{UNLABELLED[0]}_uint8.nii.gz")
    response, put_seconds = save_label(server, case, label)
    queued = response["support_bank"]["ingestion"]
    assert response["label"] == case and (case in queued["pending"] or queued["current"] == case)
    grown = server.wait_bank_idle()
    assert grown["images"] == before["images"] + 1 and grown["slices"] > before["slices"]
    ingest_seconds = grown["ingestion"]["last"]["seconds"]
    # The response did not wait for the encoders: it reported the ingestion as still queued or
    # running (asserted above). Latency figures come from scripts/bench_app.py, not from a test.
    print(f"\nPUT /datastore/label answered in {put_seconds:.3f} s; background ingestion took {ingest_seconds:.3f} s")
    assert sha256(datastore / "labels" / "final" / f"{case}.nii.gz") == sha256(label)
    # The next inference uses the new examples: the image's own slices are now its nearest supports.
    _, result = server.client().infer("fewshot", case, {"matching": False, "top_k": 4, "memories": 1})
    assert case in supports_used(result)

    done = grown["ingestion"]["completed"]
    save_label(server, case, label)  # re-saving replaces the image's entries, never adds to them
    again = server.wait_bank_idle()
    assert again["ingestion"]["completed"] > done
    assert (again["images"], again["slices"], again["per_label"]) == (grown["images"], grown["slices"], grown["per_label"])


@server_test
def test_a_label_submitted_by_slicer_lands_with_the_configured_values(server, datastore, app_tmp):
    """Slicer numbers the exported segments 1..K in segment order (gallbladder 5, the found value 6)
    and sends label_info with their names; the datastore must hold the configured values (6, 7)."""
    server.wait_bank_idle()
    info = server.client().info()
    case = image_id(UNLABELLED[1])
    truth = with_found_value(chaos_label(UNLABELLED[1]))
    first_liver_slices = np.zeros(truth.shape, bool)
    first_liver_slices[:, :, np.nonzero((truth == 1).any(axis=(0, 1)))[0][:3]] = True
    truth[first_liver_slices & (truth == 1)] = LABELS_YAML["gallbladder"]  # something painted as gallbladder too
    exported, label_info = slicer_export(truth, info["labels"], INFO_LABELS)
    assert {5, 6} <= set(np.unique(exported).tolist())  # Slicer's numbering differs from the label map
    upload = save_nifti(exported, UNLABELLED[1], app_tmp / "slicer_export.nii.gz")
    response, _ = save_label(server, case, upload, params={"label_info": label_info})
    assert response["label"] == case
    stored = datastore / "labels" / "final" / f"{case}.nii.gz"
    assert np.array_equal(read_label(stored), truth)
    assert np.allclose(nib.load(stored).affine, nib.load(datastore / f"{case}.nii.gz").affine, atol=1e-4)
    bank = server.wait_bank_idle()
    assert case in bank["image_ids"] and "gallbladder" in bank["per_label"]
    assert server.manifest()["images"][case]["source"]["label_sha256"] == sha256(stored)
    stored_info = server.client().datastore()["objects"][case]["labels"]["final"]["info"]
    assert stored_info["label_info"] == label_info


@server_test
def test_two_concurrent_saves_both_land(server, datastore, app_tmp):
    """Distinct new labels for two images, sent at once from two threads: each file and each
    bank record must be the one sent (a lost or crossed save fails)."""
    before = server.wait_bank_idle()
    uploads = {}
    for case, drop in (("1", 3), (UNLABELLED[1], 2)):
        values = read_label(datastore / "labels" / "final" / f"image_{case}.nii.gz").astype(np.uint8)
        values[values == drop] = 0  # a structure removed: differs from what the datastore holds
        uploads[image_id(case)] = save_nifti(values, case, app_tmp / f"concurrent_{case}.nii.gz")
    for case, path in uploads.items():
        assert sha256(path) != sha256(datastore / "labels" / "final" / f"{case}.nii.gz")
    results, errors, seconds = {}, [], {}
    barrier = threading.Barrier(len(uploads))

    def put(case, label):
        try:
            barrier.wait()
            results[case], seconds[case] = save_label(server, case, label)
        except Exception as exc:  # reported below
            errors.append(f"{case}: {exc}")

    threads = [threading.Thread(target=put, args=item) for item in uploads.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and set(results) == set(uploads)
    bank = server.wait_bank_idle()
    assert bank["images"] == before["images"]  # both were in the bank: replaced, not added
    manifest = server.manifest()["images"]
    for case, label in uploads.items():
        stored = datastore / "labels" / "final" / f"{case}.nii.gz"
        assert sha256(stored) == sha256(label)
        assert manifest[case]["source"]["label_sha256"] == sha256(label)
    assert not bank["ingestion"]["failed"]
    print(f"\nconcurrent PUT /datastore/label: {seconds}")
    # Everything is labelled now: nothing left to propose.
    assert server.client().next_sample("bank_coverage", {}) == {}


@server_test
def test_deleting_a_label_removes_its_entries(server, datastore):
    before = server.wait_bank_idle()
    case = image_id(UNLABELLED[1])
    status, body = server.request("DELETE", f"/datastore/label?id={case}&tag=final")
    assert status == 200, body
    bank = server.wait_bank_idle()
    assert case not in bank["image_ids"] and bank["images"] == before["images"] - 1
    assert not (datastore / "labels" / "final" / f"{case}.nii.gz").exists()
    assert server.client().next_sample("bank_coverage", {})["id"] == case


@server_test
def test_uploaded_image_joins_then_leaves_with_its_label(server, datastore):
    before = server.wait_bank_idle()
    client = server.client()
    assert client.upload_image(str(CHAOS / "image_8.nii.gz"), "uploaded_8")["image"] == "uploaded_8"
    save_label(server, "uploaded_8", CHAOS / "label_8.nii.gz")
    grown = server.wait_bank_idle()
    assert "uploaded_8" in grown["image_ids"] and grown["images"] == before["images"] + 1
    status, body = server.request("DELETE", "/datastore/image?id=uploaded_8")
    assert status == 200, body
    bank = server.wait_bank_idle()
    assert "uploaded_8" not in bank["image_ids"] and bank["images"] == before["images"]
    assert not list(datastore.rglob("uploaded_8*"))


@server_test
def test_replacing_a_labelled_image_keeps_its_labels(server, datastore, app_tmp):
    """image_1 uploaded again, as NRRD this time: its labels stay listed (strategies must not
    propose it, its label can still be deleted), and no stale image_1.nii.gz is left beside it."""
    import SimpleITK as sitk

    server.wait_bank_idle()
    case = image_id(LABELLED[0])
    nrrd_copy = app_tmp / f"{case}.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(datastore / f"{case}.nii.gz")), str(nrrd_copy))
    mark = len(server.log())
    assert server.client().upload_image(str(nrrd_copy), case)["image"] == case
    assert (datastore / f"{case}.nrrd").exists() and not (datastore / f"{case}.nii.gz").exists()
    objects = server.client().datastore()["objects"]
    assert "final" in objects[case]["labels"]
    server.wait_for_log(rf"bank: ingest of '{case}' queued \(image replaced\)", start=mark)
    bank = server.wait_bank_idle()
    assert case in bank["image_ids"] and not bank["ingestion"]["failed"]
    unlabelled = {i for i, o in server.client().datastore()["objects"].items() if "final" not in o["labels"]}
    for strategy in ("first", "random", "bank_coverage"):
        proposal = server.client().next_sample(strategy, {})
        assert proposal.get("id") in unlabelled, (strategy, proposal)
    status, _ = server.request("HEAD", f"/datastore/label?image={case}&tag=final")
    assert status == 200


@server_test
def test_a_session_image_can_be_segmented(server, app_tmp):
    """A volume sent without adding it to the datastore (Slicer's session mode)."""
    client = server.client()
    session = client.create_session(str(CHAOS / "image_8.nii.gz"))
    session_id = session["session_id"]
    label_file, result = client.infer("fewshot", "", {"matching": False, "top_k": 4, "memories": 1}, session_id=session_id)
    assert nib.load(label_file).shape == nib.load(CHAOS / "image_8.nii.gz").shape
    assert set(result["segmented"]) == set(server.bank()["per_label"])
    status, _ = server.request("DELETE", f"/session/{session_id}")
    assert status == 200


@server_test
def test_batch_infer_runs_in_a_process_that_leaves_the_bank_alone(server, datastore):
    """MONAI Label runs /batch/infer as `python -m monailabel.interfaces.utils.app`: a second copy
    of the app. It must neither start ingestion (which empties the live server's scratch folder)
    nor write the bank; its results are `original` labels."""
    bank = server.wait_bank_idle()
    scratch = datastore / ".fewshot" / "ingest-random-tiny"
    marker = scratch / "in-flight-marker"
    marker.write_text("a snapshot the live server is ingesting")
    manifest = (datastore / ".fewshot" / "bank-random-tiny" / "manifest.json").read_bytes()
    params = {"device": "cpu", "multi_gpu": False, "save_label": True, "label_tag": "original", "max_workers": 1, "max_batch_size": 1,
              "matching": False, "top_k": 4, "memories": 1}
    status, body = server.request("POST", "/batch/infer/fewshot?images=unlabeled", body=params)
    assert status == 200, body
    deadline = time.time() + 240
    while time.time() < deadline:
        status, body = server.request("GET", "/batch/infer")
        task = json.loads(body)
        if task.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(1)
    details = "\n".join(task.get("details", []))
    assert task.get("status") == "DONE", details or task
    assert "bank read-only, no ingestion" in server.log()
    assert marker.exists()
    assert (datastore / ".fewshot" / "bank-random-tiny" / "manifest.json").read_bytes() == manifest
    originals = list((datastore / "labels" / "original").glob("*.nii.gz"))
    assert len(originals) == 1 and originals[0].name[:-len(".nii.gz")] not in bank["image_ids"]
    # The live server picks up the index the background process rewrote.
    original_of = originals[0].name[:-len(".nii.gz")]
    deadline = time.time() + 10
    while "original" not in server.client().datastore()["objects"][original_of]["labels"] and time.time() < deadline:
        time.sleep(0.25)
    assert "original" in server.client().datastore()["objects"][original_of]["labels"]
    marker.unlink()
    assert server.bank()["images"] == bank["images"]


@server_test
def test_an_unusable_final_label_takes_its_entries_out_of_the_bank(server, datastore, labels_with_found_value):
    """A final label rewritten on disk (behind the server's back) with one that no longer fits its
    image: the bank must stop serving the old label's slices, and say why."""
    before = server.wait_bank_idle()
    case = image_id(LABELLED[1])
    assert case in before["image_ids"]
    path = datastore / "labels" / "final" / f"{case}.nii.gz"
    image = nib.load(datastore / f"{case}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((12, 12, 12), np.uint8), image.affine), path)  # rewritten in place
    deadline = time.time() + INGEST_TIMEOUT
    while time.time() < deadline:
        bank = server.bank()
        if case not in bank["image_ids"] and "does not match image shape" in bank["ingestion"]["failed"].get(case, ""):
            break
        time.sleep(0.25)
    assert case not in bank["image_ids"], bank
    assert "does not match image shape" in bank["ingestion"]["failed"][case]
    assert "previous bank entries were removed" in bank["ingestion"]["failed"][case]
    assert case not in server.manifest()["images"]
    # Fixed on disk: back in the bank, the failure cleared.
    shutil.copyfile(labels_with_found_value, path)
    deadline = time.time() + INGEST_TIMEOUT
    while time.time() < deadline and case not in server.bank()["image_ids"]:
        time.sleep(0.25)
    bank = server.wait_bank_idle()
    assert case in bank["image_ids"] and case not in bank["ingestion"]["failed"]
    assert str(FOUND) in bank["per_label"]


def infer_in_background(server: Server, case: str) -> tuple[threading.Thread, dict]:
    done = {}

    def run():
        _, done["result"] = server.client().infer("fewshot", case, {"matching": False, "top_k": 4, "memories": 1})
        done["at"] = time.time()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, done


def answers_while(thread: threading.Thread, server: Server, upload: Path, case: str, until: float) -> tuple[int, list]:
    """GET /info then PUT /datastore/label, again and again while ``thread`` (an inference) runs.
    Returns how many pairs were answered before the inference finished, and their latencies.
    A server that queued them behind the inference would answer none before it finished; counting
    answers, not comparing latencies to a threshold, keeps this from flaking on a loaded machine."""
    answered, seconds = 0, []
    while thread.is_alive() and time.time() < until:
        seconds.append(timed_get_info(server))
        seconds.append(save_label(server, case, upload)[1])
        answered += thread.is_alive()
    return answered, seconds


@server_test
def test_info_and_saves_answer_while_an_inference_and_an_ingestion_run(server, datastore, app_tmp):
    """/info and label saves answer at once while an inference runs; and an inference asked for
    while an ingestion is in flight (paused before its commit by the test hook) does not wait for it."""
    server.wait_bank_idle()
    case = image_id(UNLABELLED[0])
    upload = save_nifti(chaos_label(UNLABELLED[0]), UNLABELLED[0], datastore.parent / "resave_uint8.nii.gz")
    thread, done = infer_in_background(server, case)
    answered, seconds = answers_while(thread, server, upload, case, time.time() + 120)
    thread.join(120)
    assert "result" in done and answered >= 1, (answered, seconds)
    print(f"\nduring an inference: {answered} GET /info + PUT label pairs answered, max {max(seconds):.3f} s")

    server.wait_bank_idle()
    assert server.client().upload_image(str(CHAOS / "image_8.nii.gz"), SLOW_ID)["image"] == SLOW_ID
    mark = len(server.log())
    save_label(server, SLOW_ID, CHAOS / "label_8.nii.gz")
    server.wait_for_log(rf"test hook .*ingestion of '{SLOW_ID}' paused", start=mark)
    paused_at = time.time()
    thread, done = infer_in_background(server, case)
    answered, seconds = answers_while(thread, server, upload, case, paused_at + INGEST_PAUSE - 1)
    thread.join(120)
    assert "result" in done
    # Finished before the paused ingestion committed: the inference did not wait for its lock,
    # and neither did /info or the saves asked for meanwhile.
    assert done["at"] - paused_at < INGEST_PAUSE and SLOW_ID not in server.bank()["image_ids"], done["at"] - paused_at
    assert answered >= 1 and max(seconds) < INGEST_PAUSE / 2, (answered, seconds)
    (app_tmp / RELEASE_FILE).touch()  # the paused ingestion may commit now
    bank = server.wait_bank_idle()
    (app_tmp / RELEASE_FILE).unlink()  # later pauses (the kill -9 test) hold again
    assert SLOW_ID in bank["image_ids"]


@server_test
def test_kill9_during_ingestion_then_restart_reloads_and_repairs(server, datastore, models_dir, app_tmp):
    server.wait_bank_idle()
    bank_dir = datastore / ".fewshot" / "bank-random-tiny"
    manifest = json.loads((bank_dir / "manifest.json").read_text())
    kept = {i: r["shard"] for i, r in manifest["images"].items()}
    kept_mtimes = {i: (bank_dir / "shards" / s).stat().st_mtime_ns for i, s in kept.items()}
    assert SLOW_ID in kept

    # A new label for slow_case; its ingestion pauses before the commit: the kill lands there.
    values = chaos_label("8")
    values[values == 3] = 0
    new_label = save_nifti(values, "8", app_tmp / "slow_case_new.nii.gz")
    mark = len(server.log())
    save_label(server, SLOW_ID, new_label)
    server.wait_for_log(rf"test hook .*ingestion of '{SLOW_ID}' paused", start=mark)
    server.kill9()
    label_sha = sha256(datastore / "labels" / "final" / f"{SLOW_ID}.nii.gz")
    assert label_sha == sha256(new_label)  # the label itself was saved
    killed = json.loads((bank_dir / "manifest.json").read_text())["images"]
    assert killed[SLOW_ID]["source"]["label_sha256"] != label_sha  # killed before the commit
    # What a write killed half-way leaves in the datastore: removed at the next start.
    stale = datastore / "labels" / "final" / f".{SLOW_ID}.nii.gz.{'0' * 32}.tmp"
    stale.write_bytes(b"half a label")

    restarted = Server(datastore, models_dir, app_tmp / "restart.log", extra=[("bank.augmentations_per_slice", "0")],
                       env=server_env(app_tmp)).start()
    try:
        restarted.wait_ready()
        bank = restarted.wait_bank_idle()
        log = restarted.log()
        reloaded = re.search(r"support bank reloaded from .*: (\d+) images", log)
        assert reloaded and int(reloaded.group(1)) == len(kept), log[-3000:]
        assert re.search(r"bank: resync \d+/\d+", log) and f"bank: ingesting '{SLOW_ID}'" in log, log[-3000:]
        # Reloaded, not rebuilt: the other images' shards are the very same files.
        manifest = json.loads((bank_dir / "manifest.json").read_text())
        for image, shard in kept.items():
            if image != SLOW_ID:
                assert manifest["images"][image]["shard"] == shard
                assert (bank_dir / "shards" / shard).stat().st_mtime_ns == kept_mtimes[image]
        # Repaired: the killed ingestion is redone from the label on disk.
        assert manifest["images"][SLOW_ID]["source"]["label_sha256"] == label_sha
        assert bank["images"] == len([p for p in (datastore / "labels" / "final").iterdir() if p.name.endswith(".nii.gz")])
        assert not [p for p in (bank_dir / "shards").iterdir() if p.name.startswith(".tmp")]
        assert not stale.exists()
    finally:
        restarted.stop()


# ---------------------------------------------------------------------------------------------
# the demo datastore shipped with the project


def _generator():
    return load_script("make_sample_datastore")


def _decoded(path: Path):
    """What a reader sees of a file: voxels and header fields for NIfTI, text otherwise (gzip
    bytes carry a timestamp and compressor details that do not matter)."""
    if path.name.endswith((".nii", ".nii.gz")):
        img = nib.load(path)
        return np.asarray(img.dataobj), dict(img.header.items())
    return path.read_text()


def _equal(x, y) -> bool:
    x, y = np.asarray(x), np.asarray(y)
    try:
        return np.array_equal(x, y, equal_nan=True)  # unset scl_slope is NaN in both
    except TypeError:  # text fields
        return np.array_equal(x, y)


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        (va, ha), (vb, hb) = a, b
        return va.dtype == vb.dtype and np.array_equal(va, vb) and ha.keys() == hb.keys() and all(_equal(ha[k], hb[k]) for k in ha)
    return a == b


def test_sample_datastore_is_deterministic_and_loadable(tmp_path):
    from fewshot.volume import read_label, read_volume

    gen = _generator()
    first = gen.write_datastore(tmp_path / "a", cases=6, labelled=3, seed=0)
    gen.write_datastore(tmp_path / "b", cases=6, labelled=3, seed=0)
    committed = PROJECT / "sample-datastore"
    for rel in first:
        a, b, c = (_decoded(root / rel) for root in (tmp_path / "a", tmp_path / "b", committed))
        assert _same(a, b), f"{rel}: two runs of the generator differ"
        assert _same(a, c), f"sample-datastore/{rel} differs from what its generator writes"
    assert sum((committed / rel).stat().st_size for rel in first) < 2 * 1024 * 1024
    images = sorted(committed.glob("*.nii.gz"))
    labels = sorted((committed / "labels" / "final").glob("*.nii.gz"))
    assert 0 < len(labels) < len(images)
    for path in images:
        volume = read_volume(path)
        assert volume.array.ndim == 3
    for path in labels:
        label = read_label(path, read_volume(committed / path.name), allowed=list(gen.LABELS.values()))
        assert len(set(np.unique(label).tolist()) - {0}) >= 2


# ---------------------------------------------------------------------------------------------
# the app's own pieces, without a server (fake engine host)


@pytest.fixture
def app_lib():
    """The app's ``lib`` package, imported as MONAI Label imports it (app folder first on sys.path)."""
    sys.path.insert(0, str(APP))
    try:
        import lib.activelearning.bank_coverage
        import lib.embedding_cache
        import lib.ingest
        import lib.labels
        import lib.sessions
        import lib.validation

        yield lib
    finally:
        sys.path.remove(str(APP))
        for name in [m for m in sys.modules if m == "lib" or m.startswith("lib.")]:
            del sys.modules[name]


class FakeDatastore:
    def __init__(self, unlabelled: dict[str, str]):
        self.unlabelled = unlabelled

    def get_unlabeled_images(self, *args):
        return list(self.unlabelled)

    def get_image_uri(self, image_id):
        return self.unlabelled.get(image_id, "")


class FakeHost:
    """A host around a real in-memory SupportBank holding the given unit vectors (None: empty bank)."""

    def __init__(self, vectors: np.ndarray | None):
        from fewshot.bank import SupportBank
        from fewshot.bank_shards import SliceBatch

        self.bank = SupportBank(None, "fp")
        if vectors is not None:
            n = len(vectors)
            self.bank.put("labelled", SliceBatch(
                images=np.zeros((n, 4, 4), np.float32), masks=np.ones((n, 4, 4), np.uint16),
                embeddings=vectors, slice_index=np.arange(n), augmentation=[""] * n,
            ))

    def propose(self, embeddings):
        from fewshot.coverage import propose

        return propose(self.bank, embeddings)


def _unit_rows(*rows) -> np.ndarray:
    a = np.asarray(rows, np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_bank_coverage_scores_cached_embeddings_only(app_lib, tmp_path):
    files = {}
    vectors = {
        "typical_a": _unit_rows([1, 0.1, 0], [1, 0.2, 0]),
        "typical_b": _unit_rows([1, 0, 0.1], [1, 0.1, 0.1]),
        "outlier": _unit_rows([0, 0, 1], [0, 0.1, 1]),
        "unreadable": None,
    }
    for name in vectors:
        files[name] = str(tmp_path / f"{name}.nii.gz")
        Path(files[name]).write_bytes(name.encode())  # distinct content: distinct cache keys
    calls = []

    def compute(path):
        calls.append(path)
        found = vectors[Path(path).name.removesuffix(".nii.gz")]
        if found is None:
            raise ValueError("not a readable medical image")
        return found

    cache = app_lib.embedding_cache.EmbeddingCache(tmp_path / "cache", "embedder-key", compute)
    BankCoverage = app_lib.activelearning.bank_coverage.BankCoverage
    datastore = FakeDatastore(files)

    # Nothing cached yet: no embedding inside the request, the first unlabelled image in id order.
    cold = BankCoverage(FakeHost(None), cache)
    first = cold(None, datastore)
    assert first["id"] == "outlier" and "not computed yet" in first["reason"] and len(first["warming"]) == 4
    assert not calls
    while cold.warm_step(datastore):  # the background idle task, one image per step
        pass
    assert sorted(calls) == sorted(files.values())
    empty = cold(None, datastore)
    assert empty["id"] in ("typical_a", "typical_b") and "most typical" in empty["reason"] and "warming" not in empty
    covered = BankCoverage(FakeHost(_unit_rows([1, 0.1, 0.05])), cache)(None, datastore)
    assert covered["id"] == "outlier" and covered["reason"] == "farthest from the support bank"
    assert len(list((tmp_path / "cache" / "embedder-key").glob("*.npy"))) == 3  # each computed once, kept
    assert not cold.warm_step(datastore) and len(calls) == 4  # the unreadable one is not retried
    assert BankCoverage(FakeHost(None), cache)(None, FakeDatastore({})) is None
    # Every candidate unusable: still a proposal, in id order.
    only_bad = FakeDatastore({"unreadable": files["unreadable"]})
    assert cold(None, only_bad)["id"] == "unreadable"


class SlowHost:
    """Records ingestions; fails the test if two ever overlap. ``fail`` maps an image id to the
    exceptions its next ingestions raise."""

    def __init__(self, fail=None):
        self.calls, self.active, self.overlap = [], 0, False
        self.engine = type("E", (), {"bank": type("B", (), {"label_values": [1]})()})()
        self.in_bank: set[str] = set()
        self.fail = {k: list(v) for k, v in (fail or {}).items()}
        self._lock = threading.Lock()

    def ingest(self, image_id, image_path, label_path, source, annotation=None):
        with self._lock:
            self.active += 1
            self.overlap |= self.active > 1
        try:
            self.calls.append((image_id, Path(label_path).read_text()))
            if self.fail.get(image_id):
                raise self.fail[image_id].pop(0)
            time.sleep(0.2)
            self.in_bank.add(image_id)
        finally:
            with self._lock:
                self.active -= 1
        return type("R", (), {"slices": 1, "labels": [1]})()

    def remove(self, image_id):
        self.calls.append((image_id, "removed"))
        present = image_id in self.in_bank
        self.in_bank.discard(image_id)
        return present

    def stale_images(self, sources, annotation_of=None):
        return {}

    def bank_ids(self):
        return sorted(self.in_bank)

    def refresh_stats(self):
        return {}


def test_ingestion_worker_serialises_and_latest_save_wins(app_lib, tmp_path):
    labels = {}

    def write(image_id, text):
        # Atomically, as the datastore saves labels: a file truncated then written could be read
        # half-way by the worker's snapshot (seen once in CI as an empty read on a loaded machine).
        labels[image_id] = str(tmp_path / f"{image_id}.nii.gz")
        tmp = tmp_path / f".{image_id}.tmp"
        tmp.write_text(text)
        os.replace(tmp, labels[image_id])

    host = SlowHost()
    host.in_bank.add("c")
    worker = app_lib.ingest.IngestionWorker(host, sources=lambda: {k: ("img", v) for k, v in labels.items()})
    worker.start()
    try:
        write("a", "a1")
        worker.ingest("a")
        deadline = time.time() + 10  # until "a1" is being ingested (a fixed sleep flakes on a loaded machine)
        while not host.calls and time.time() < deadline:
            time.sleep(0.005)
        for text in ("a2", "a3"):
            write("a", text)
            worker.ingest("a")  # queued twice while busy: one job, reading the latest file
        write("b", "b1")
        worker.ingest("b")
        worker.remove("c")
        assert worker.wait_idle(10)
    finally:
        worker.stop()
    assert not host.overlap
    assert host.calls == [("a", "a1"), ("a", "a3"), ("b", "b1"), ("c", "removed")]
    assert worker.status()["completed"] == 4 and not worker.status()["failed"]


def test_ingestion_failure_removes_stale_entries_and_retries_io_errors(app_lib, tmp_path, monkeypatch):
    from fewshot.volume import VolumeError

    monkeypatch.setattr(app_lib.ingest, "RETRY_DELAYS", (0.2, 0.2, 0.2))
    labels = {i: str(tmp_path / f"{i}.nii.gz") for i in ("bad", "flaky")}
    for path in labels.values():
        Path(path).write_text("label")
    host = SlowHost(fail={"bad": [VolumeError("bad.nii.gz: label shape (1, 1, 1) does not match image shape")],
                          "flaky": [OSError("disk hiccup")]})
    host.in_bank |= {"bad", "flaky"}  # entries of earlier, good labels
    worker = app_lib.ingest.IngestionWorker(host, sources=lambda: {k: ("img", v) for k, v in labels.items()})
    worker.start()
    try:
        worker.ingest("bad")
        worker.ingest("flaky")
        deadline = time.time() + 10
        while time.time() < deadline and (worker.busy() or worker.status()["retrying"] or len(host.calls) < 4):
            time.sleep(0.05)
    finally:
        worker.stop()
    status = worker.status()
    # The current label of "bad" is unusable: its old entries must not keep serving.
    assert "bad" not in host.in_bank and ("bad", "removed") in host.calls
    assert "does not match image shape" in status["failed"]["bad"] and "entries were removed" in status["failed"]["bad"]
    # An I/O error is retried, and the entries stay meanwhile; the retry succeeds.
    assert [c for c in host.calls if c[0] == "flaky"] == [("flaky", "label"), ("flaky", "label")]
    assert "flaky" in host.in_bank and "flaky" not in status["failed"] and not status["retrying"]


def test_session_archives_are_unpacked_only_inside_their_folder(app_lib, tmp_path):
    from fastapi import HTTPException

    extract = app_lib.sessions.extract_archive
    outside = tmp_path / "outside.txt"

    def tar_with(member: tarfile.TarInfo, data: bytes = b"x") -> Path:
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            member.size = len(data) if member.isfile() else 0
            tf.addfile(member, io.BytesIO(data) if member.isfile() else None)
        return path

    link = tarfile.TarInfo("series/link")
    link.type, link.linkname = tarfile.SYMTYPE, str(outside)
    bad = [tar_with(tarfile.TarInfo("../outside.txt")), tar_with(tarfile.TarInfo(str(outside))), tar_with(link)]
    evil_zip = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil_zip, "w") as zf:
        zf.writestr("../outside.txt", b"x")
    for archive in bad + [evil_zip]:
        dest = tmp_path / f"dest-{archive.name}"
        dest.mkdir()
        with pytest.raises(HTTPException) as err:
            extract(str(archive), str(dest))
        assert err.value.status_code == 400, archive
    assert not outside.exists()
    good = tar_with(tarfile.TarInfo("series/slice_001.dcm"), b"dicom")
    dest = tmp_path / "dest-good"
    dest.mkdir()
    extract(str(good), str(dest))
    assert (dest / "series" / "slice_001.dcm").read_bytes() == b"dicom"
    with pytest.raises(HTTPException) as err:
        extract(str(tmp_path / "outside.rar"), str(dest))
    assert err.value.status_code == 415


def test_slicer_label_names_and_value_translation(app_lib, tmp_path):
    labels = app_lib.labels
    label_map = {"liver": 1, "spleen": 4, "kidney": 2}
    names = labels.result_label_names(label_map)
    assert slicer_import_names(names) == ["liver", "kidney", "unused_3", "spleen"]
    assert names["background"] == 0
    # Exported in segment order liver, kidney, spleen -> 1, 2, 3; spleen must become 4.
    exported = np.array([0, 1, 2, 3, 3], np.uint8)
    table = labels.value_table(exported, ["liver", "kidney", "spleen"], label_map, True, "upload")
    assert table[exported].tolist() == [0, 1, 2, 4, 4]
    assert labels.value_table(exported, ["liver", "kidney", "spleen"], {"liver": 1, "kidney": 2, "spleen": 3}, True, "u") is None

    import nrrd

    # An NRRD upload keeps its header; only the values change.
    path = tmp_path / "upload.nrrd"
    header = {"space": "left-posterior-superior", "space directions": np.diag([0.5, 0.5, 2.0]), "space origin": np.array([1.0, 2.0, 3.0])}
    nrrd.write(str(path), exported.reshape(5, 1, 1), header)
    out = app_lib.validation.rewrite_values(str(path), table)
    data, out_header = nrrd.read(out)
    assert data.ravel().tolist() == [0, 1, 2, 4, 4]
    assert np.allclose(out_header["space directions"], header["space directions"]) and np.allclose(out_header["space origin"], [1, 2, 3])
    os.unlink(out)
