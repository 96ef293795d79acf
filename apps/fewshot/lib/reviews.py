"""Reviews of served predictions (``fewshot.review``) wired to the server: the infer task keeps each prediction
it serves for a datastore image, and the bank's worker, once it has ingested that image's final label, compares
the two. ``/info`` shows the result under the task's ``reviews``: the latest ones, and the mean Dice by how many
labelled scans the bank held, which is this datastore's own growth curve.

Nothing here may fail a request or an ingestion: a prediction that cannot be kept (a full disk) or a review that
cannot be made is logged, and the user's inference and label are unaffected.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

from fewshot.annotation import Annotation
from fewshot.review import Prediction, PredictionStore, ReviewError, ReviewJournal, review
from fewshot.volume import VolumeError, read_volume

logger = logging.getLogger(__name__)

IMAGE_KEY = "fewshot_image_id"  # the request key naming the datastore image inferred (set by the app, not clients)


class Reviews:
    def __init__(self, predictions_dir: Path, journal_path: Path, bank_ids: Callable[[], list[str]], preset: str):
        self.store = PredictionStore(predictions_dir)
        self.journal = ReviewJournal(journal_path)
        self.bank_ids = bank_ids
        self.preset = preset

    def served(self, image_id: str | None, seg) -> None:
        """Keep a prediction for review, unless the image's own label was already in the bank (it could see it)."""
        if not image_id or not seg.labels:
            return
        bank = self.bank_ids()
        if image_id in bank:
            return
        prediction = Prediction(image_id, seg.label, seg.volume.affine, dict(seg.labels), len(bank), self.preset, time.time())
        try:
            self.store.put(prediction)
        except OSError as exc:
            logger.warning("prediction of %r not kept for review: %s", image_id, exc)

    def label_ingested(self, image_id: str, label_path: str, snapshot: Path, annotation: Annotation) -> None:
        """The final label (``snapshot``: the bytes just ingested) against the prediction served before it was saved."""
        prediction = self.store.get(image_id)
        if prediction is None:
            return
        try:
            saved_at = os.stat(label_path).st_mtime
        except OSError:
            saved_at = time.time()
        try:
            final = read_volume(snapshot)
            item = review(prediction, final.array, final.affine, saved_at, annotation)
        except (VolumeError, ReviewError, OSError) as exc:
            logger.warning("prediction of %r not reviewed: %s", image_id, exc)
            return
        if item is None:
            return
        try:
            self.journal.record(item)
        except OSError as exc:
            logger.warning("review of %r not recorded: %s", image_id, exc)
            return
        logger.info("review of %r: the prediction made with %d labelled scan(s) against the saved label: Dice %s (mean %s)",
                    image_id, item.bank_images, item.dice, item.mean)

    def summary(self) -> dict:
        return self.journal.summary()
