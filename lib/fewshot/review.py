"""How much of a served prediction the annotator kept: the bank's accuracy on the user's own scans.

The promise is that each saved label makes the next scan better. On a clinic's own data nobody holds a
reference to score against, except at one moment: when a person saves the final label of a scan the
server had segmented, that label is the reference for that prediction. So a prediction served for a
datastore image is kept (``PredictionStore``) until the image's final label is saved; then the two are
compared (``review``): Dice per label over what the person annotated, with how many labelled scans the
bank held when the prediction was made. ``ReviewJournal`` keeps the latest review of each image, and
``growth`` groups them by that bank size: the growth curve of this datastore, measured by its users'
corrections, not by a benchmark.

A review is honest only if the prediction could not see the label it is compared with: a prediction is
kept only for an image without a final label in the bank, and it is compared only with a label saved
after it was made, on the same voxel grid.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from fewshot.annotation import Annotation
from fewshot.eval.metrics import dice
from fewshot.files import atomic_write, write_json_atomic

logger = logging.getLogger(__name__)

KEPT_REVIEWS = 1000  # the journal keeps the latest review of this many images
KEPT_PREDICTIONS = 500  # predictions awaiting a label, the newest kept: images inferred and never labelled add up
RECENT = 10  # reviews /info lists in full


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


@dataclass(frozen=True)
class Prediction:
    """A label the server served for a datastore image, on the image's voxel grid (its array order)."""

    image_id: str
    label: np.ndarray  # integer label values; 0 background
    affine: np.ndarray  # (4, 4) of the image it was made for
    labels: Mapping[str, int]  # the labels it segmented: name -> value (a label it skipped is not judged)
    bank_images: int  # labelled scans in the bank when it was made
    preset: str
    made_at: float  # time.time()


class PredictionStore:
    """One prediction per image, ``<folder>/<sha256 of the id>.npz``: the latest served wins. The file name
    is a digest, so no image id (any length, any characters) can name a path outside the folder. A prediction
    stays after its review (saving the label again reviews it again); beyond ``KEPT_PREDICTIONS`` the oldest go."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path(self, image_id: str) -> Path:
        return self.folder / (hashlib.sha256(image_id.encode("utf-8", "surrogatepass")).hexdigest() + ".npz")

    def put(self, prediction: Prediction) -> None:
        """Written whole or not at all (a crash or a full disk leaves the previous one)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"image_id": prediction.image_id, "labels": dict(prediction.labels), "bank_images": int(prediction.bank_images),
                "preset": prediction.preset, "made_at": float(prediction.made_at)}
        label = np.asarray(prediction.label)
        dtype = np.uint8 if label.size == 0 or int(label.max()) < 256 else np.uint16
        with atomic_write(self.path(prediction.image_id), "wb") as f:
            np.savez_compressed(f, label=label.astype(dtype), affine=np.asarray(prediction.affine, np.float64),
                                meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
        self._prune()

    def _prune(self) -> None:
        kept = []
        for path in self.folder.glob("*.npz"):
            try:
                kept.append((path.stat().st_mtime_ns, path.name, path))
            except FileNotFoundError:  # pruned by another thread meanwhile
                continue
        for _, _, path in sorted(kept)[:max(0, len(kept) - KEPT_PREDICTIONS)]:
            path.unlink(missing_ok=True)

    def get(self, image_id: str) -> Prediction | None:
        """None when there is none, or when the file cannot be read (said in the log: a review is lost, nothing else)."""
        path = self.path(image_id)
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                label, affine = np.array(data["label"]), np.array(data["affine"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
            logger.warning("prediction kept for %r cannot be read (%s): it will not be reviewed", image_id, exc)
            return None
        if meta.get("image_id") != image_id:  # a digest collision, or a file copied in by hand
            return None
        return Prediction(image_id, label, affine, {str(k): int(v) for k, v in meta["labels"].items()},
                          int(meta["bank_images"]), str(meta["preset"]), float(meta["made_at"]))


@dataclass(frozen=True)
class Review:
    """One prediction against the final label saved after it."""

    image_id: str
    dice: dict[str, float]  # label name -> Dice over the annotated part
    bank_images: int  # labelled scans in the bank when the prediction was made
    preset: str
    predicted_at: str
    saved_at: str
    partial: bool  # the saved label covers only some slices or labels; the Dice is over those

    @property
    def mean(self) -> float | None:
        return round(float(np.mean(list(self.dice.values()))), 4) if self.dice else None

    def as_dict(self) -> dict:
        return dict(asdict(self), mean=self.mean)


class ReviewError(ValueError):
    """The prediction and the saved label cannot be compared."""


def review(prediction: Prediction, final: np.ndarray, affine: np.ndarray, saved_at: float,
           annotation: Annotation | None = None) -> Review | None:
    """Dice of each label the prediction segmented and the person annotated, over the annotated slices.
    A label absent from both there is not scored (nothing to find). None when the label was saved before
    the prediction was made (the comparison would not be one of a prediction with its correction);
    ReviewError when the two lie on different grids."""
    if saved_at <= prediction.made_at:
        return None
    final = np.asarray(final)
    if final.shape != prediction.label.shape or not np.allclose(affine, prediction.affine, rtol=1e-4, atol=1e-3):
        raise ReviewError(f"the prediction of {prediction.image_id!r} ({prediction.label.shape}) and its saved label "
                          f"({final.shape}) lie on different grids: the image was replaced in between")
    annotation = annotation or Annotation()
    predicted, saved = prediction.label, final
    if annotation.slices is not None:
        index = [slice(None)] * final.ndim
        index[annotation.axis] = sorted(annotation.slices)
        predicted, saved = predicted[tuple(index)], saved[tuple(index)]
    annotated = None if annotation.labels is None else set(annotation.labels)
    scores = {}
    for name, value in sorted(prediction.labels.items(), key=lambda kv: kv[1]):
        if annotated is not None and value not in annotated:
            continue
        score = dice(predicted == value, saved == value, both_empty=float("nan"))
        if not np.isnan(score):
            scores[name] = round(float(score), 4)
    return Review(prediction.image_id, scores, prediction.bank_images, prediction.preset, _stamp(prediction.made_at),
                  _stamp(saved_at), annotation.partial)


class ReviewJournal:
    """The latest review of each image, in the order they were saved (``<state>/reviews.json``, rewritten whole
    at each review: a crash leaves the previous journal). Thread-safe: the bank's worker writes, /info reads."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._reviews: list[dict] = self._read()

    def _read(self) -> list[dict]:
        try:
            data = json.loads(self.path.read_text())
            reviews = [r for r in data["reviews"] if isinstance(r, dict) and "image_id" in r]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("review journal %s cannot be read (%s): starting a new one", self.path, exc)
            return []
        return reviews[-KEPT_REVIEWS:]

    def record(self, item: Review) -> None:
        """A review the journal holds already is left where it is: a bank rebuilt from the final labels ingests
        every label again, and must neither reorder the journal nor rewrite it once per image."""
        entry = item.as_dict()
        with self._lock:
            if entry in self._reviews:
                return
            kept = [r for r in self._reviews if r["image_id"] != item.image_id] + [entry]
            kept = kept[-KEPT_REVIEWS:]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {"reviews": kept})
            self._reviews = kept

    def reviews(self) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._reviews]

    def summary(self) -> dict:
        """For /info: how many, the latest in full, and the growth curve by bank size."""
        reviews = self.reviews()
        return {"count": len(reviews), "recent": reviews[-RECENT:][::-1], "by_bank_size": growth(reviews)}


def growth(reviews: list[dict]) -> list[dict]:
    """Mean Dice of the reviewed predictions per bank size (labelled scans when each was made), smallest first."""
    by_size: dict[int, list[float]] = {}
    for r in reviews:
        if r.get("mean") is not None:
            by_size.setdefault(int(r["bank_images"]), []).append(float(r["mean"]))
    return [{"bank_images": size, "reviews": len(means), "mean_dice": round(float(np.mean(means)), 4)}
            for size, means in sorted(by_size.items())]


__all__ = ["Prediction", "PredictionStore", "Review", "ReviewError", "ReviewJournal", "growth", "review"]
