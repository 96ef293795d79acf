"""Issue 12 on a real server with a folder datastore: an inference's progress a client can poll,
and partial annotations (a label saved for some slices only) that never put unannotated slices in
the bank as organ-free negatives. Also the review of a served prediction against the final label
saved after it (lib/reviews.py), which needs the same kind of server.

One server (preset random-tiny, no augmented copies, a test-only pause after each inference step
so that a poll sees the steps advance) on five CHAOS T2 volumes from ../shared/data, one labelled.
"""
from __future__ import annotations

import json
import shutil
import threading
import time

import nibabel as nib
import numpy as np
import pytest

from app_harness import Server, expected_dice
from test_app_server import CHAOS, LABELS_YAML, chaos_label, save_nifti, server_test

STEP_PAUSE = 0.1  # seconds each inference step waits (FEWSHOT_APP_TEST_INFER_STEP_PAUSE): 3.6 s over 36 slices, polled every 0.05 s
WAIT = 300  # generous wait-until bound, never a timing assertion
NEGATIVES = 4  # random-tiny's bank.negatives_per_image


@pytest.fixture(scope="module")
def app_tmp(tmp_path_factory):
    if not CHAOS.is_dir() or not any(CHAOS.glob("image_*")):
        pytest.skip(f"real data {CHAOS} is absent (it lives in ../shared/data beside the project)")
    return tmp_path_factory.mktemp("progress-partial")


@pytest.fixture(scope="module")
def datastore(app_tmp):
    root = app_tmp / "datastore"
    (root / "labels" / "final").mkdir(parents=True)
    for case in ("1", "3", "5", "8", "10"):
        shutil.copyfile(CHAOS / f"image_{case}.nii.gz", root / f"image_{case}.nii.gz")
    shutil.copyfile(CHAOS / "label_1.nii.gz", root / "labels" / "final" / "image_1.nii.gz")
    (root / "labels.yaml").write_text("".join(f"{n}: {v}\n" for n, v in LABELS_YAML.items()))
    return root


@pytest.fixture(scope="module")
def server(datastore, models_dir, app_tmp):
    srv = Server(datastore, models_dir, app_tmp / "server.log", extra=[("bank.augmentations_per_slice", "0")],
                 env={"FEWSHOT_APP_TEST_INFER_STEP_PAUSE": str(STEP_PAUSE)}).start()
    srv.wait_ready()
    yield srv
    srv.stop()


def progress(server: Server, key: str) -> tuple[int, dict | str]:
    status, body = server.request("GET", f"/fewshot/progress/{key}")
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def record(server: Server, image_id: str) -> dict:
    return server.manifest()["images"][image_id]


def busiest_slices(label: np.ndarray, count: int) -> list[int]:
    """The ``count`` slices (along the third axis) with the most labelled voxels, apart from each other."""
    voxels = (label > 0).sum(axis=(0, 1))
    order = [int(z) for z in np.argsort(-voxels, kind="stable") if voxels[z]]
    chosen = []
    for z in order:
        if all(abs(z - c) > 2 for c in chosen):
            chosen.append(z)
        if len(chosen) == count:
            break
    return sorted(chosen)


def only_slices(label: np.ndarray, slices: list[int]) -> np.ndarray:
    out = np.zeros_like(label)
    out[:, :, slices] = label[:, :, slices]
    return out


# ---------------------------------------------------------------------------------------------
# progress


@server_test
def test_progress_advances_while_an_inference_runs_then_reports_done(server):
    server.wait_bank_idle()
    assert progress(server, "run-1")[0] == 404  # nothing under that id yet
    done: dict = {}

    def infer():
        done["result"] = server.client().infer("fewshot", "image_3", {"request_id": "run-1"})[1]

    thread = threading.Thread(target=infer)
    thread.start()
    seen = []
    deadline = time.time() + WAIT
    while time.time() < deadline:
        status, body = progress(server, "run-1")
        if status == 200:
            seen.append(body)
            if body["state"] in ("done", "failed"):
                break
        time.sleep(0.05)
    thread.join(WAIT)
    assert "result" in done and seen, server.log()[-3000:]
    final = seen[-1]
    assert final["state"] == "done" and final["stage"] == "done" and final["fraction"] == 1.0, final
    assert final["image"] == "image_3" and final["model"] == "fewshot" and final["finished_at"]
    assert final["total"] > 1 and final["done"] == final["total"] == done["result"]["timings"]["slices"]
    running = [s for s in seen if s["state"] == "running" and s["stage"] == "segmenting"]
    steps = sorted({s["done"] for s in running})
    assert len(steps) >= 2, [(s["state"], s["stage"], s["done"]) for s in seen]  # the status advanced while it ran
    fractions = [s["fraction"] for s in seen]
    assert fractions == sorted(fractions) and all(0 <= f <= 1 for f in fractions)
    assert any(s["eta"] is not None and s["eta"] >= 0 for s in running)

    # Without a request_id the inference is filed under its image id; GET /fewshot/progress lists both.
    server.client().infer("fewshot", "image_5", {})
    status, body = progress(server, "image_5")
    assert status == 200 and body["state"] == "done" and body["image"] == "image_5", body
    status, body = server.request("GET", "/fewshot/progress")
    assert status == 200 and [i["id"] for i in json.loads(body)["inferences"]][:2] == ["image_5", "run-1"]
    assert progress(server, "..")[0] == 400
    status, body = server.request("POST", "/infer/fewshot?image=image_5", fields={"params": json.dumps({"request_id": "a/b"})}, files={})
    assert status == 400 and "request_id" in body, body


# ---------------------------------------------------------------------------------------------
# partial annotations through PUT /datastore/label


@server_test
def test_a_label_annotated_on_some_slices_puts_only_those_in_the_bank(server, datastore, app_tmp):
    before = server.wait_bank_idle()
    truth = chaos_label("3")
    slices = busiest_slices(truth, 2)
    path = save_nifti(only_slices(truth, slices), "3", app_tmp / "partial_3.nii.gz")

    # Malformed or contradicting annotation params: 4xx, nothing stored.
    for params, status_expected, words in (
        ({"annotated_slices": "3"}, 400, "list of whole numbers"),
        ({"annotated_slices": [999]}, 422, "outside the label"),
        ({"annotated_slices": slices, "annotated_axis": 5}, 400, "annotated_axis"),
        ({"annotated_labels": ["tumour"]}, 422, "not labels of this app"),
        ({"annotation": {"slices": slices}}, 400, "may not set 'annotation'"),
    ):
        status, body = server.request("PUT", "/datastore/label?image=image_3", files={"label": str(path)},
                                      fields={"params": json.dumps(params)})
        assert status == status_expected and words in body, (params, status, body)
    assert not (datastore / "labels" / "final" / "image_3.nii.gz").exists()

    response = server.client().save_label("image_3", str(path), params={"annotated_slices": slices})
    assert response["label"] == "image_3"
    bank = server.wait_bank_idle()
    assert bank["images"] == before["images"] + 1
    entry = record(server, "image_3")
    assert entry["source"]["slice_axis"] == 2  # CHAOS T2 is cut along its third axis, as the slices are listed
    # Only the two annotated slices: none of the other slices (most hold organs) became a negative.
    assert entry["entries"] == len(slices), entry
    assert entry["source"]["annotation"]["slices"] == slices and entry["source"]["annotation"]["partial"] is True
    assert bank["negative_slices"] == before["negative_slices"]
    assert bank["partial_annotations"]["image_3"]["slices"] == slices
    info = server.client().info()["models"]["fewshot"]["support_bank"]
    assert info["partial_annotations"]["image_3"]["how"] == "params annotated_slices"

    # partial: true says "the slices holding labelled voxels"; the label keeps its other voxels on disk.
    truth5 = chaos_label("5")
    painted = busiest_slices(truth5, 3)
    path5 = save_nifti(only_slices(truth5, painted), "5", app_tmp / "partial_5.nii.gz")
    server.client().save_label("image_5", str(path5), params={"partial": True})
    bank = server.wait_bank_idle()
    entry = record(server, "image_5")
    assert entry["entries"] == len(painted) and entry["source"]["annotation"]["slices"] == painted, entry
    assert bank["negative_slices"] == before["negative_slices"]

    # Only the liver annotated (on every slice): a slice without liver may hold the other organs, so
    # none becomes a negative; the liver's slices are entries.
    liver = np.where(truth5 == LABELS_YAML["liver"], truth5, 0)
    path5 = save_nifti(liver, "5", app_tmp / "liver_5.nii.gz")
    server.client().save_label("image_5", str(path5), params={"annotated_labels": ["liver"]})
    server.wait_bank_idle()
    entry = record(server, "image_5")
    liver_slices = int(((liver > 0).sum(axis=(0, 1)) > 0).sum())
    assert entry["entries"] == liver_slices and entry["source"]["annotation"]["labels"] == [LABELS_YAML["liver"]], entry
    assert entry["source"]["annotation"]["slices"] is None

    # Saved again as a complete label (no annotation params): every slice counts, negatives included.
    full = save_nifti(truth, "3", app_tmp / "full_3.nii.gz")
    server.client().save_label("image_3", str(full))
    bank = server.wait_bank_idle()
    entry = record(server, "image_3")
    positives = int(((truth > 0).sum(axis=(0, 1)) > 0).sum())
    assert entry["entries"] == positives + NEGATIVES and "annotation" not in entry["source"], entry
    assert "image_3" not in bank["partial_annotations"]


# ---------------------------------------------------------------------------------------------
# reviews: a served prediction against the final label saved after it


def reviews(server: Server) -> dict:
    return server.client().info()["models"]["fewshot"]["reviews"]


@server_test
def test_a_saved_label_reviews_the_prediction_served_before_it(server, datastore, app_tmp):
    bank = server.wait_bank_idle()
    result_file, result = server.client().infer("fewshot", "image_8", {})
    predicted = np.asarray(nib.load(result_file).dataobj)
    segmented = result["segmented"]
    assert segmented and predicted.shape == chaos_label("8").shape
    # A client naming another image for the review is overruled: image_10's result must not replace image_8's.
    server.client().infer("fewshot", "image_10", {"fewshot_image_id": "image_8"})

    # Saved for two slices: judged on those two only.
    truth = chaos_label("8")
    slices = busiest_slices(truth, 2)
    path = save_nifti(only_slices(truth, slices), "8", app_tmp / "review_partial_8.nii.gz")
    server.client().save_label("image_8", str(path), params={"annotated_slices": slices})
    server.wait_bank_idle()
    latest = reviews(server)["recent"][0]
    assert latest["image_id"] == "image_8" and latest["partial"] is True, latest
    assert latest["bank_images"] == bank["images"] and latest["preset"] == "random-tiny"
    assert latest["dice"] == expected_dice(predicted, truth, segmented, slices) != {}, latest
    assert latest["mean"] == round(float(np.mean(list(latest["dice"].values()))), 4)

    # Saved again, whole: the same prediction judged on every slice; still one review of image_8.
    server.client().save_label("image_8", str(save_nifti(truth, "8", app_tmp / "review_full_8.nii.gz")))
    server.wait_bank_idle()
    summary = reviews(server)
    latest = summary["recent"][0]
    assert latest["image_id"] == "image_8" and latest["partial"] is False
    assert latest["dice"] == expected_dice(predicted, truth, segmented), latest
    assert [r["image_id"] for r in summary["recent"]].count("image_8") == 1
    at_size = [r["mean"] for r in summary["recent"] if r["bank_images"] == bank["images"]]
    assert {"bank_images": bank["images"], "reviews": len(at_size), "mean_dice": round(float(np.mean(at_size)), 4)} \
        in summary["by_bank_size"], summary

    # An image whose own label is in the bank: its prediction could see that label, so no review follows.
    server.client().infer("fewshot", "image_1", {})
    server.client().save_label("image_1", str(save_nifti(chaos_label("1"), "1", app_tmp / "review_1.nii.gz")))
    assert server.wait_bank_idle()["ingestion"]["last"]["image"] == "image_1"
    assert all(r["image_id"] != "image_1" for r in reviews(server)["recent"])


# ---------------------------------------------------------------------------------------------
# without a server


def test_annotated_slices_map_onto_the_engines_slicing_axis():
    from fewshot.annotation import Annotation

    shape = (4, 5, 6)
    assert Annotation().file_slices(shape, 2) is None and not Annotation().partial
    some = Annotation(slices=(1, 3), axis=2)
    assert some.partial and some.file_slices(shape, 2) == {1, 3}
    # Cut along another axis, a slice is annotated only if it lies wholly in the annotated region.
    assert some.file_slices(shape, 0) == set()
    assert Annotation(slices=tuple(range(6)), axis=2).file_slices(shape, 0) == {0, 1, 2, 3}
    assert Annotation.from_dict(some.as_dict()) == some
    with pytest.raises(ValueError):
        Annotation(slices=(6,), axis=2).check(shape)


def test_progress_board_keeps_the_latest_per_id_and_never_goes_back():
    import sys

    from test_app_server import APP

    sys.path.insert(0, str(APP))
    try:
        from lib.progress import ProgressBoard
    finally:
        sys.path.remove(str(APP))
        for name in [m for m in sys.modules if m == "lib" or m.startswith("lib.")]:
            del sys.modules[name]
    board = ProgressBoard(keep=2)
    first = board.start("a", "a", "fewshot")
    assert first.as_dict()["state"] == "waiting" and first.as_dict()["eta"] is None
    first.stage_to("preparing")
    first.step(2, 4)
    first.step(1, 4)  # a late callback never moves it back
    item = first.as_dict()
    assert (item["state"], item["stage"], item["done"], item["fraction"]) == ("running", "segmenting", 2, 0.5)
    second = board.start("a", "a", "fewshot")  # the same image again: the latest wins
    assert board.get("a") is second and board.by_token(first.token) is None
    first.finish()  # the first request ending does not touch the second's entry
    assert board.get("a").as_dict()["state"] == "waiting"
    board.start("b", "b", "m"), board.start("c", "c", "m")
    assert board.get("a") is None and [i["id"] for i in board.all()] == ["c", "b"]
    board.get("c").fail("boom")
    assert board.get("c").as_dict()["state"] == "failed" and board.get("c").as_dict()["message"] == "boom"
