"""Keeping the DICOMweb datastore's final labels in step with the PACS's SEG series, which any tool
may store (OHIF's export, another viewer, a script): at start-up (retried while the PACS cannot be
reached; meanwhile the cache's labels are used as they are), then every ``pacs_poll_seconds``. For
each image series the latest SEG that references it is its final label (a PACS keeps every saved
version); new or newer ones are fetched, converted and checked, cached labels whose SEG is gone are
dropped, and the datastore's listener (the ingestion worker) hears of each change.

The sync owns its datastore, never the reverse: the datastore serves images and user saves, and
knows nothing of this loop. Its state is the ``pacs`` entry of /info's support bank.
"""
from __future__ import annotations

import itertools
import json
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from pydicom.dataset import Dataset

from lib import annotations
from lib.dicom_seg import seg_stamp, seg_to_label
from lib.dicomweb_datastore import FINAL, NIFTI, FewshotDicomWebDatastore
from lib.pacs_client import PacsError, http_detail

logger = logging.getLogger(__name__)

SYNC_RETRY_DELAYS = (5.0, 15.0, 60.0, 300.0)  # seconds before each new start-up sync while the PACS is unreachable


class PacsSync:
    def __init__(self, datastore: FewshotDicomWebDatastore):
        self.datastore = datastore
        self._lock = threading.Lock()
        self._sync: dict = {"state": "not started"}
        self._unusable: dict[str, str] = {}  # SEG series uid -> why it cannot be used

    def _latest_segs(self, listing: dict[str, dict]) -> dict[str, dict]:
        """Image series -> its latest SEG series on the PACS (uid, study, stamp)."""
        try:
            found = self.datastore.client.search_for_series(search_filters={"Modality": "SEG"}, get_remaining=True)
        except Exception as exc:
            raise PacsError(f"the PACS's SEG series cannot be listed ({type(exc).__name__}: {exc})") from None
        latest: dict[str, dict] = {}
        for item in found:
            ds = Dataset.from_json(item)
            seg_uid, study = str(ds.get("SeriesInstanceUID", "") or ""), str(ds.get("StudyInstanceUID", "") or "")
            ref = self.datastore.seg_index.get(seg_uid)
            if ref is None:
                try:
                    meta = Dataset.from_json(self.datastore.client.retrieve_series_metadata(study, seg_uid)[0])
                except Exception as exc:
                    logger.warning("PACS: metadata of SEG series %s unreadable (%s); skipped this time", seg_uid, exc)
                    continue
                refs = meta.get("ReferencedSeriesSequence") or []
                image = str(refs[0].get("SeriesInstanceUID", "")) if refs else None
                if not image:
                    logger.warning("PACS: SEG series %s references no image series; ignored", seg_uid)
                self.datastore.seg_index.remember(seg_uid, image or None, seg_stamp(meta), study)
                ref = self.datastore.seg_index.get(seg_uid)
            image = ref.get("image")
            if image not in listing:
                continue
            candidate = {"uid": seg_uid, "study": ref.get("study") or study, "stamp": ref.get("stamp", "")}
            best = latest.get(image)
            if best is None or (candidate["stamp"], candidate["uid"]) > (best["stamp"], best["uid"]):
                latest[image] = candidate
        return latest

    def status(self) -> dict:
        with self._lock:
            return json.loads(json.dumps(self._sync))

    def _set_sync(self, **changes) -> None:
        with self._lock:
            self._sync.update(changes)

    def run(self, keep_going: Callable[[], bool] = lambda: True, poll_seconds: float | None = None) -> None:
        """The start-up sync, retried while the PACS cannot be reached (meanwhile the cache's
        labels are used as they are); then, with ``poll_seconds``, the same sync every
        ``poll_seconds`` for as long as ``keep_going``: a SEG series stored, replaced or removed on
        the PACS by any tool (OHIF's export, another viewer, a script) reaches the cache and the bank
        within about that delay. A poll that finds nothing new costs two QIDO searches."""
        if poll_seconds:
            self._set_sync(poll_seconds=poll_seconds)  # in /info from the start: how soon a SEG is seen
        for attempt in itertools.count():
            if self.sync()["state"] == "done" or not keep_going():
                break
            delay = SYNC_RETRY_DELAYS[min(attempt, len(SYNC_RETRY_DELAYS) - 1)]
            self._set_sync(retry_at=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + delay)))
            time.sleep(delay)
            if not keep_going():
                return
        if not poll_seconds:
            return
        while keep_going():
            self._set_sync(next_poll=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + poll_seconds)))
            time.sleep(poll_seconds)
            if not keep_going():
                return
            polls = self.status().get("polls", 0) + 1
            self.sync(quiet=True)
            self._set_sync(polls=polls)

    def sync(self, quiet: bool = False) -> dict:
        """Bring the cache's final labels in step with the PACS's SEG series (start-up, then every
        poll). ``quiet``: a sync that changes nothing is logged at debug level (a poll)."""
        started = time.time()
        self._set_sync(state="syncing", started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        try:
            listing = self.datastore.listing.series(refresh=True)
            latest = self._latest_segs(listing)
        except Exception as exc:
            message = http_detail(exc)
            logger.error("PACS: sync failed: %s; the cache's final labels are used as they are", message)
            self._set_sync(state="failed", error=message, attempts=self.status().get("attempts", 0) + 1)
            return self.status()
        fetched, removed, failed = [], [], {}
        for image_id in sorted(self.datastore.cached_finals() - set(latest)):
            if self._drop_final_if_older(image_id, started, "its SEG series is no longer on the PACS"):
                removed.append(image_id)
        for n, (image_id, seg) in enumerate(sorted(latest.items()), 1):
            self._set_sync(progress=f"{n}/{len(latest)}")
            if seg["uid"] in self._unusable:  # a SEG never changes: not downloaded again at every poll
                failed[image_id] = self._unusable[seg["uid"]]
                continue
            try:
                if self._fetch_final(image_id, seg, started):
                    fetched.append(image_id)
            except Exception as exc:
                failed[image_id] = f"SEG series {seg['uid']}: {http_detail(exc)}"
                if not isinstance(exc, PacsError):  # unreadable, not unreachable
                    self._unusable[seg["uid"]] = failed[image_id]
                logger.error("PACS: final label of series %s not usable: %s", image_id, failed[image_id])
                # Whatever the cache holds for it is not the PACS's latest final label.
                if self._drop_final_if_older(image_id, started, "its latest SEG series is not usable"):
                    removed.append(image_id)
        seconds = round(time.time() - started, 2)
        changed = bool(fetched or removed) or failed != self.status().get("failed", {})
        if quiet and not changed:  # a poll that found nothing new: the last changes stay on show
            self._set_sync(state="done", progress="", series=len(listing), labelled=len(latest), error=None,
                           retry_at=None, checked=time.strftime("%Y-%m-%dT%H:%M:%S"))
            return self.status()
        logger.log(
            logging.INFO if changed or not quiet else logging.DEBUG,
            "PACS: %s (%d image series, %d with a final label: %d fetched, %d removed, %d not usable) in %.1f s",
            "in step" if not (fetched or removed or failed) else "synchronised",
            len(listing), len(latest), len(fetched), len(removed), len(failed), seconds,
        )
        self._set_sync(
            state="done", progress="", series=len(listing), labelled=len(latest), fetched=fetched, removed=removed,
            failed=failed, seconds=seconds, error=None, retry_at=None, checked=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        return self.status()

    def _fetch_final(self, image_id: str, seg: dict, started: float) -> bool:
        current = self.datastore.final_info(image_id)
        if current and (current.get("dicom_seg") or {}).get("SeriesInstanceUID") == seg["uid"]:
            return False
        if current and current.get("saved_at", 0) >= started:
            return False  # saved here since the PACS was listed: newer than what the listing saw
        image_path = self.datastore.get_image_uri(image_id)
        work = Path(tempfile.mkdtemp(prefix="seg-", dir=self.datastore.scratch))
        try:
            self.datastore.download(seg["study"], seg["uid"], work / "seg")
            label, annotation = seg_to_label(image_id, image_path, work / "seg", work / f"label{NIFTI}",
                                             self.datastore.validator.label_map())
            stored = self.datastore.validator.check_label(image_id, image_path, label)
            with self.datastore.labels_lock:
                current = self.datastore.final_info(image_id)
                if current and current.get("saved_at", 0) >= started:
                    return False
                info = {
                    "source": "PACS",
                    "dicom_seg": {"SeriesInstanceUID": seg["uid"], "StudyInstanceUID": seg["study"], "ReferencedSeriesInstanceUID": image_id, "stamp": seg["stamp"]},
                }
                if annotation.partial:
                    info[annotations.INFO_KEY] = annotation.as_dict()
                self.datastore.put_label(image_id, FINAL, stored, info)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        logger.info("PACS: final label of series %s fetched from SEG series %s", image_id, seg["uid"])
        self.datastore.listener.final_label_saved(image_id, "final label fetched from the PACS")
        return True

    def _drop_final_if_older(self, image_id: str, started: float, why: str) -> bool:
        with self.datastore.labels_lock:
            current = self.datastore.final_info(image_id)
            if current is None or current.get("saved_at", 0) >= started:
                return False
            self.datastore.drop_label(image_id, FINAL)
        logger.info("PACS: cached final label of series %s dropped: %s", image_id, why)
        self.datastore.listener.final_label_removed(image_id)
        return True
