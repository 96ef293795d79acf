"""Reviews of served predictions (fewshot.review): a prediction against the final label saved after it.

Engine units here; the server's wiring (an inference kept, a save reviewed, /info) is tested on a real
server in tests/test_app_progress_partial.py.
"""
from __future__ import annotations

import json
import os
import types

import nibabel as nib
import numpy as np
import pytest

from fewshot.annotation import Annotation
from fewshot.eval.metrics import dice
from fewshot.review import Prediction, PredictionStore, ReviewError, ReviewJournal, growth, review
from test_app_server import SlowHost, app_lib  # noqa: F401 (app_lib: a fixture)

AFFINE = np.diag([1.5, 1.5, 4.0, 1.0])
LABELS = {"liver": 1, "spleen": 2, "kidney": 3}


def two_organs(shape=(20, 24, 6)) -> np.ndarray:
    label = np.zeros(shape, np.uint16)
    label[2:10, 3:12, 1:5] = 1
    label[12:18, 14:22, 2:6] = 2
    return label


def prediction(label: np.ndarray, made_at: float = 100.0, labels=None, bank_images: int = 3) -> Prediction:
    return Prediction("case 1", label, AFFINE, dict(labels or LABELS), bank_images, "classic", made_at)


def test_a_review_scores_each_segmented_label_present_in_either():
    truth = two_organs()
    predicted = truth.copy()
    predicted[2:10, 3:8, 1:5] = 0  # the liver cut short
    predicted[0:2, 0:2, 0] = 3  # a kidney where there is none
    item = review(prediction(predicted), truth, AFFINE, saved_at=200.0)
    assert item.dice["liver"] == round(dice(predicted == 1, truth == 1), 4) < 1
    assert item.dice["spleen"] == 1.0
    assert item.dice["kidney"] == 0.0  # predicted where the person left none: scored, not skipped
    assert item.mean == round(float(np.mean(list(item.dice.values()))), 4)
    assert item.bank_images == 3 and item.preset == "classic" and not item.partial
    # A label absent from both is not scored (nothing to find), and a label the prediction skipped is not judged.
    item = review(prediction(truth, labels={"liver": 1, "spleen": 2, "gallbladder": 6}), truth, AFFINE, 200.0)
    assert set(item.dice) == {"liver", "spleen"}
    item = review(prediction(truth, labels={"liver": 1}), truth, AFFINE, 200.0)
    assert set(item.dice) == {"liver"}


def test_a_partial_label_is_judged_on_what_was_annotated_only():
    truth = two_organs()
    predicted = truth.copy()
    predicted[:, :, 5] = 0  # wrong on slice 5 (the spleen's last)
    annotated = np.zeros_like(truth)
    annotated[:, :, [2, 3]] = truth[:, :, [2, 3]]  # the person painted slices 2 and 3 only
    item = review(prediction(predicted), annotated, AFFINE, 200.0, Annotation(slices=(2, 3), axis=2))
    assert item.dice == {"liver": 1.0, "spleen": 1.0} and item.partial  # slice 5 is not theirs to judge
    # Along another axis: rows 12..17 hold the spleen only.
    item = review(prediction(predicted), truth, AFFINE, 200.0, Annotation(slices=tuple(range(12, 18)), axis=0))
    assert set(item.dice) == {"spleen"} and item.dice["spleen"] == round(dice(predicted[12:18] == 2, truth[12:18] == 2), 4)
    # Only the liver annotated: the spleen's voxels in the file say nothing.
    item = review(prediction(predicted), np.where(truth == 1, 1, 0), AFFINE, 200.0, Annotation(labels=(1,)))
    assert item.dice == {"liver": 1.0}


def test_no_review_of_a_label_saved_before_the_prediction_nor_across_grids():
    truth = two_organs()
    assert review(prediction(truth, made_at=300.0), truth, AFFINE, saved_at=200.0) is None
    with pytest.raises(ReviewError, match="different grids"):
        review(prediction(truth), truth[:, :, :5], AFFINE, 200.0)
    moved = AFFINE.copy()
    moved[2, 3] = 4.0  # a slice further on
    with pytest.raises(ReviewError, match="replaced"):
        review(prediction(truth), truth, moved, 200.0)


def test_predictions_are_kept_per_image_under_a_digest_and_a_bad_file_is_no_review(tmp_path, caplog):
    store = PredictionStore(tmp_path / "predictions")
    label = two_organs()
    for image_id in ("../../escape", "x" * 300, "1.2.840.10008.5.1"):
        store.put(Prediction(image_id, label, AFFINE, LABELS, 2, "classic", 123.5))
        got = store.get(image_id)
        assert got.image_id == image_id and got.labels == LABELS and got.bank_images == 2 and got.made_at == 123.5
        assert np.array_equal(got.label, label) and np.array_equal(got.affine, AFFINE)
        assert store.path(image_id).parent == tmp_path / "predictions"
    assert store.get("never predicted") is None
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == sorted(
        store.path(i).name for i in ("../../escape", "x" * 300, "1.2.840.10008.5.1"))  # no temporary file left
    # The latest served wins.
    store.put(Prediction("1.2.840.10008.5.1", label * 0, AFFINE, LABELS, 5, "classic", 200.0))
    assert store.get("1.2.840.10008.5.1").bank_images == 5 and not store.get("1.2.840.10008.5.1").label.any()
    store.path("1.2.840.10008.5.1").write_bytes(b"not a zip")
    assert store.get("1.2.840.10008.5.1") is None and "cannot be read" in caplog.text


def test_the_store_keeps_the_newest_predictions_only(tmp_path, monkeypatch):
    import fewshot.review as module

    monkeypatch.setattr(module, "KEPT_PREDICTIONS", 2)
    store = PredictionStore(tmp_path)
    for n in range(3):
        store.put(Prediction(f"case {n}", two_organs(), AFFINE, LABELS, n, "classic", 100.0 + n))
        os.utime(store.path(f"case {n}"), ns=(n * 10**9, n * 10**9))  # the order they were written, to the file system
    store.put(Prediction("case 1", two_organs(), AFFINE, LABELS, 9, "classic", 200.0))  # served again: the newest
    assert store.get("case 0") is None and store.get("case 2").bank_images == 2 and store.get("case 1").bank_images == 9


def test_a_prediction_or_review_that_cannot_be_written_fails_nothing(app_lib, tmp_path, caplog):
    import lib.reviews

    (tmp_path / "not a folder").write_text("a file where the folders should be")
    reviews = lib.reviews.Reviews(tmp_path / "not a folder" / "predictions", tmp_path / "not a folder" / "reviews.json",
                                  bank_ids=lambda: ["other"], preset="classic")
    seg = types.SimpleNamespace(label=two_organs(), volume=types.SimpleNamespace(affine=AFFINE), labels=dict(LABELS))
    reviews.served("case 1", seg)  # the disk refuses: logged, the inference goes on
    assert "not kept for review" in caplog.text
    # A prediction that was kept, and a journal that cannot be written: the ingestion goes on.
    reviews.store = PredictionStore(tmp_path / "predictions")
    reviews.served("case 1", seg)
    reviews.served("other", seg)  # its own label is in the bank: not kept
    assert reviews.store.get("other") is None and reviews.store.get("case 1").bank_images == 1
    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(two_organs().astype(np.uint8), AFFINE), label)
    reviews.label_ingested("case 1", str(label), label, Annotation())
    assert "not recorded" in caplog.text and reviews.summary()["count"] == 0
    reviews.journal = ReviewJournal(tmp_path / "reviews.json")
    reviews.label_ingested("case 1", str(label), label, Annotation())
    assert reviews.summary()["recent"][0]["dice"] == {"liver": 1.0, "spleen": 1.0}


def test_the_journal_keeps_the_latest_review_of_each_image_across_restarts(tmp_path, monkeypatch, caplog):
    import fewshot.review as module

    path = tmp_path / "state" / "reviews.json"
    journal = ReviewJournal(path)
    truth = two_organs()
    first = review(prediction(truth, bank_images=1), truth, AFFINE, 200.0)
    journal.record(first)
    half = truth.copy()
    half[2:10, 3:8] = 0
    journal.record(review(Prediction("case 2", half, AFFINE, LABELS, 2, "classic", 100.0), truth, AFFINE, 300.0))
    journal.record(review(Prediction("case 3", truth, AFFINE, LABELS, 2, "classic", 100.0), truth, AFFINE, 300.0))
    written = path.stat().st_ino
    journal.record(review(Prediction("case 2", half, AFFINE, LABELS, 2, "classic", 100.0), truth, AFFINE, 300.0))
    assert path.stat().st_ino == written  # the same review again (a bank rebuilt ingests every label again): no rewrite
    assert [r["image_id"] for r in ReviewJournal(path).reviews()] == ["case 1", "case 2", "case 3"]  # nor a new order
    again = review(prediction(half, bank_images=1), truth, AFFINE, 400.0)  # case 1 saved again, corrected further
    journal.record(again)
    reviews = ReviewJournal(path).reviews()  # read back from disk
    assert [r["image_id"] for r in reviews] == ["case 2", "case 3", "case 1"]
    assert reviews[-1]["dice"] == again.dice and reviews[-1]["mean"] == again.mean
    summary = ReviewJournal(path).summary()
    assert summary["count"] == 3 and [r["image_id"] for r in summary["recent"]] == ["case 1", "case 3", "case 2"]
    means = {r["image_id"]: r["mean"] for r in reviews}
    assert summary["by_bank_size"] == [
        {"bank_images": 1, "reviews": 1, "mean_dice": means["case 1"]},
        {"bank_images": 2, "reviews": 2, "mean_dice": round((means["case 2"] + means["case 3"]) / 2, 4)}]
    assert growth([{"image_id": "a", "bank_images": 1, "mean": None}]) == []  # nothing scored: no point

    monkeypatch.setattr(module, "KEPT_REVIEWS", 2)
    journal = ReviewJournal(path)
    journal.record(review(Prediction("case 4", truth, AFFINE, LABELS, 4, "classic", 100.0), truth, AFFINE, 300.0))
    assert [r["image_id"] for r in ReviewJournal(path).reviews()] == ["case 1", "case 4"]

    path.write_text("{not json")
    assert ReviewJournal(path).reviews() == [] and "cannot be read" in caplog.text
    json.dumps(ReviewJournal(path).summary())  # /info serialises it


def test_the_worker_hands_each_ingested_label_over_and_survives_what_follows_it(app_lib, tmp_path):
    labels = {"a": tmp_path / "a.nii.gz", "b": tmp_path / "b.nii.gz"}
    for image_id, path in labels.items():
        path.write_text(f"{image_id}1")
    seen = []

    def after(image_id, label_path, snapshot, annotation):
        seen.append((image_id, label_path, snapshot.read_text(), annotation.partial))
        if image_id == "a":
            raise RuntimeError("review failed")

    host = SlowHost()
    worker = app_lib.ingest.IngestionWorker(host, sources=lambda: {k: ("img", str(v)) for k, v in labels.items()},
                                    scratch_dir=tmp_path / "scratch", after_ingest=after,
                                    annotation_of=lambda image_id: Annotation(slices=(1,)) if image_id == "b" else Annotation())
    worker.start()
    try:
        worker.ingest("a")
        worker.ingest("b")
        assert worker.wait_idle(10)
    finally:
        worker.stop()
    assert seen == [("a", str(labels["a"]), "a1", False), ("b", str(labels["b"]), "b1", True)]
    status = worker.status()
    assert status["completed"] == 2 and not status["failed"]  # the hook's failure is not the ingestion's
    assert not any((tmp_path / "scratch").iterdir())  # snapshots removed after the hook
