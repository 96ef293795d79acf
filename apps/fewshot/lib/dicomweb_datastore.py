"""A DICOMweb datastore for the few-shot app (what OHIF's MONAI Label panel needs).

The PACS holds the truth: image series, and final labels as DICOM SEG series that reference them.
Series are downloaded on first use and cached as NIfTI in MONAI Label's DICOMweb cache folder
(``MONAI_LABEL_DICOMWEB_CACHE_PATH``/<md5 of the URL>, else ``~/.cache/monailabel/dicom/<md5>``),
a local MONAI Label datastore whose image ids are SeriesInstanceUIDs. The support bank and all
scratch space live in ``<cache>/.fewshot/``, so the bank sees the same layout as with a folder.

What stock ``DICOMWebDatastore`` (MONAI Label 0.8.5) does and this one does not:

* it stores an upload as DICOM SEG without looking at it (a label of the wrong shape, garbage),
  and needs dcmqi's ``itkimage2segimage``, which ``init_remote_datastore`` downloads from GitHub
  at start-up. Here an upload is checked like the local datastore's (``lib.validation``) and
  refused with a 4xx before anything reaches the PACS or the cache; the SEG is written with
  pydicom-seg (offline) and carries its image's frame of reference;
* it sends an unknown or traversing image id to the PACS (500) and caches half-downloaded series
  for good. Here an id must be a SeriesInstanceUID listed on the PACS, and a series is downloaded
  and converted in scratch space, then moved into the cache whole;
* it caches the list of series and of labelled series for two hours and lists a SEG series as an
  image when the search filter lets it through. Here the list is refreshed every
  ``LIST_TTL`` seconds, SEG and other non-image series are never images, and which series are
  labelled is read from the cache, which saves keep current.

Final labels (``tag=final``): saved to the PACS first (STOW-RS), then into the cache, then queued
for ingestion. A final label cannot be deleted through this server: DICOMweb has no delete.

This module is the datastore only. The PACS connection (client, series listing, downloads) is
``lib/pacs_client.py``; DICOM SEG reading and writing ``lib/dicom_seg.py``; bringing the cache in step
with SEG series stored on the PACS by any tool is ``lib/pacs_sync.py``, which owns a datastore (the
datastore never calls it).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.datastore.utils.convert import dicom_to_nifti
from monailabel.interfaces.datastore import DefaultLabelTag

from fewshot.annotation import Annotation
from fewshot.volume import VolumeError, read_volume
from lib import annotations, ohif_label
from lib.datastore import AtomicIndexMixin, FinalLabelListener, without_provenance
from lib.dicom_seg import SegIndex, label_to_seg, seg_stamp
from lib.labels import client_segments
from lib.pacs_client import LIST_TTL, UID_PATTERN, PacsError, SeriesListing, check_uid, download_series
from lib.validation import RESERVED_INFO_KEYS, VOLUME_SUFFIXES, UploadValidator, check_info, check_tag, volume_suffix

logger = logging.getLogger(__name__)

FINAL = DefaultLabelTag.FINAL.value
NIFTI = ".nii.gz"
# Keys this datastore records in a label's info; a client's params may not set them.
DICOM_INFO_KEYS = ("dicom_seg", "saved_at", "source")
STATE_SUBDIR = Path(".fewshot") / "dicomweb"


class FewshotDicomWebDatastore(AtomicIndexMixin, DICOMWebDatastore):
    def __init__(
        self,
        client,
        search_filter: Dict[str, Any],
        cache_path: str | os.PathLike,
        validator: UploadValidator,
        listener: FinalLabelListener,
        fetch_by_frame: bool = False,
        live: bool = True,
    ):
        """``live``: the server itself (a MONAI Label background task's process reads the cache
        and downloads what it needs, but never cleans up or syncs with the PACS)."""
        # DICOMWebDatastore.__init__ only sets these and turns on a file watcher over the cache;
        # the cache is this server's own folder, so it is skipped.
        self.client = self._client = client  # _client: the name MONAI Label's DICOMWebDatastore uses
        self.listing = SeriesListing(client, search_filter)
        self._search_filter = self.listing.search_filter
        self._fetch_by_frame = fetch_by_frame
        self._convert_to_nifti = True
        self.validator = validator
        self.listener = listener
        self.live = live
        root = Path(cache_path)
        self.state_dir = root / STATE_SUBDIR
        self.scratch = self.state_dir / "scratch"
        self._series_locks: dict[str, threading.Lock] = {}
        self._series_locks_lock = threading.Lock()
        # Held while a final label is written or dropped in the cache: user saves vs. the PACS sync.
        self.labels_lock = threading.RLock()
        logger.info("DICOMweb datastore %s; cache %s; search filter %s", client.base_url, root, self._search_filter)
        LocalDatastore.__init__(
            self, str(root), extensions=[f"*{s}" for s in VOLUME_SUFFIXES], auto_reload=False, read_only=not live
        )
        if live:
            self._remove_stale_tmp()
            shutil.rmtree(self.scratch, ignore_errors=True)  # a killed download or conversion
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.seg_index = SegIndex(self.state_dir / "seg-series.json", persist=live)

    # ------------------------------------------------------------------ the PACS's series

    def list_images(self) -> List[str]:
        return sorted(self.listing.series())

    def cached_finals(self) -> set[str]:
        objects = list(self._datastore.objects.items())  # a snapshot: saves and the sync add to it
        return {k for k, v in objects if v.labels.get(FINAL)}

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        finals = self.cached_finals()
        return [i for i in self.list_images() if i in finals]

    def get_unlabeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        finals = self.cached_finals()
        return [i for i in self.list_images() if i not in finals]

    def datalist(self, full_path=True) -> List[Dict[str, Any]]:
        return LocalDatastore.datalist(self, full_path)  # the cache, kept in step by saves and the sync

    def status(self) -> Dict[str, Any]:
        try:
            status = LocalDatastore.status(self)
        except PacsError as exc:  # /info must answer while the PACS is down
            status = {"total": len(self._datastore.objects), "completed": len(self.cached_finals()), "error": exc.detail}
        return status

    # ------------------------------------------------------------------ images (cached series)

    def local_image_uri(self, image_id: str) -> str:
        """The series' cached NIfTI, or "" when it has not been downloaded; never fetches."""
        if not isinstance(image_id, str) or not UID_PATTERN.match(image_id):
            return ""
        path = os.path.join(self._datastore.image_path(), f"{image_id}{NIFTI}")
        return os.path.realpath(path) if os.path.isfile(path) else ""

    def get_image_uri(self, image_id: str) -> str:
        check_uid(image_id)
        cached = self.local_image_uri(image_id)
        if cached:
            return cached
        return self._fetch_series(image_id, self.listing.listed(image_id))

    def _series_lock(self, image_id: str) -> threading.Lock:
        with self._series_locks_lock:
            return self._series_locks.setdefault(image_id, threading.Lock())

    def download(self, study: str, series: str, dest: Path) -> None:
        download_series(self.client, study, series, dest, self._fetch_by_frame)

    def _fetch_series(self, image_id: str, listed: dict) -> str:
        """Download a series, convert it to NIfTI in scratch space, then move both into the cache."""
        with self._series_lock(image_id):
            cached = self.local_image_uri(image_id)
            if cached:
                return cached
            start = time.perf_counter()
            work = Path(tempfile.mkdtemp(prefix="series-", dir=self.scratch))
            try:
                dicom_dir = work / "dicom"
                self.download(listed.get("StudyInstanceUID", ""), image_id, dicom_dir)
                converted = work / f"image{NIFTI}"
                try:
                    shutil.move(dicom_to_nifti(str(dicom_dir)), converted)
                    read_volume(converted)  # what the engine will do with it: 3D, readable
                except (VolumeError, RuntimeError, OSError, ValueError) as exc:
                    raise HTTPException(422, f"series {image_id} is not a 3D volume this app can segment ({exc})") from None
                series_dir = Path(self._datastore.image_path()) / image_id
                shutil.rmtree(series_dir, ignore_errors=True)
                os.replace(dicom_dir, series_dir)  # first: a cached NIfTI always has its instances beside it
                dest = Path(self._datastore.image_path()) / f"{image_id}{NIFTI}"
                os.replace(converted, dest)
                self._index_image(image_id, {k: v for k, v in listed.items() if v})
            finally:
                shutil.rmtree(work, ignore_errors=True)
            logger.info("cached series %s (%d instances) as NIfTI in %.1f s", image_id, len(os.listdir(series_dir)), time.perf_counter() - start)
            return os.path.realpath(dest)

    def _series_dir(self, image_id: str) -> Path:
        """The cached DICOM instances of a series (downloaded again if they were removed)."""
        series_dir = Path(self._datastore.image_path()) / image_id
        if not series_dir.is_dir() or not any(series_dir.iterdir()):
            with self._series_lock(image_id):
                if not series_dir.is_dir() or not any(series_dir.iterdir()):
                    work = Path(tempfile.mkdtemp(prefix="series-", dir=self.scratch))
                    try:
                        self.download(self.listing.listed(image_id).get("StudyInstanceUID", ""), image_id, work / "dicom")
                        shutil.rmtree(series_dir, ignore_errors=True)
                        os.replace(work / "dicom", series_dir)
                    finally:
                        shutil.rmtree(work, ignore_errors=True)
        return series_dir

    def _index_image(self, image_id: str, info: dict) -> None:
        with self._index_transaction():
            self._record_image(image_id, NIFTI, info)

    def _indexed(self, image_id: str) -> ImageLabelModel:
        obj = self._datastore.objects.get(image_id)
        if obj is None:  # the index was lost; the image file is there (get_image_uri ran)
            obj = self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info={"name": f"{image_id}{NIFTI}"}, ext=NIFTI))
        return obj

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        raise HTTPException(
            405, "images come from the PACS: send the series to it (STOW-RS or C-STORE); it is listed here "
            f"within {LIST_TTL:.0f} s when it matches the search filter {self._search_filter}",
        )

    def remove_image(self, image_id: str) -> None:
        raise HTTPException(405, "images live on the PACS: remove the series there; this server only caches it")

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        check_info(info, "info", RESERVED_INFO_KEYS)
        self.get_image_uri(image_id)
        LocalDatastore.update_image_info(self, image_id, info)

    # ------------------------------------------------------------------ labels

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        return LocalDatastore.get_label_uri(self, label_id, label_tag)  # the cache; the sync keeps it current

    def final_info(self, image_id: str) -> dict | None:
        obj = self._datastore.objects.get(image_id)
        label = obj.labels.get(FINAL) if obj else None
        if label is None or not os.path.isfile(os.path.join(self._datastore.label_path(FINAL), f"{image_id}{label.ext}")):
            return None
        return dict(label.info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any], label_id: str = "") -> str:
        check_tag(label_tag)
        info = without_provenance(dict(check_info({} if label_info is None else label_info, "params", RESERVED_INFO_KEYS + DICOM_INFO_KEYS)))
        grid = ohif_label.pop_grid(info, image_id)
        image_path = self.get_image_uri(image_id)
        started = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix="label-", dir=self.scratch))
        stored = upload = label_filename
        try:
            if ohif_label.is_raw(label_filename):
                # The cached image is ITK's conversion of the series OHIF shows: its voxel order is
                # the viewer's, so a grid is checked when sent, not required.
                upload = ohif_label.raw_to_nifti(image_id, image_path, label_filename, str(work / f"label{NIFTI}"), grid, grid_required=False)
            stored = self.validator.check_label(image_id, image_path, upload, client_segments(info))
            annotation = annotations.parse(info, self.validator.label_map(), stored)
            if annotation is not None:
                info[annotations.INFO_KEY] = annotation.as_dict()
            if label_tag == FINAL:
                info["dicom_seg"] = self._store_seg(image_id, stored, annotation)
                info["source"] = "saved"
            with self.labels_lock:
                self.put_label(image_id, label_tag, stored, info)
        finally:
            if stored not in (upload, label_filename) and os.path.exists(stored):
                os.unlink(stored)  # a copy with translated values, written beside the upload
            shutil.rmtree(work, ignore_errors=True)
        logger.info(
            "saved %s label of series %s%s in %.2f s", label_tag, image_id,
            f" (DICOM SEG {info['dicom_seg']['SeriesInstanceUID']} stored on the PACS)" if label_tag == FINAL else "",
            time.perf_counter() - started,
        )
        if label_tag == FINAL:
            self.listener.final_label_saved(image_id, "final label saved")
        return image_id

    def _store_seg(self, image_id: str, label_path: str, annotation: Annotation | None = None) -> dict:
        """The label as a DICOM SEG referencing its series, stored on the PACS (STOW-RS)."""
        ds = label_to_seg(image_id, label_path, self._series_dir(image_id), self.validator.label_map(), annotation)
        try:
            response = self.client.store_instances([ds])
        except Exception as exc:
            raise PacsError(f"the PACS did not store the DICOM SEG of series {image_id} ({type(exc).__name__}: {exc}); nothing was saved") from None
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise PacsError(f"the PACS refused the DICOM SEG of series {image_id} (failure reasons {reasons}); nothing was saved")
        seg = {
            "SeriesInstanceUID": str(ds.SeriesInstanceUID),
            "SOPInstanceUID": str(ds.SOPInstanceUID),
            "StudyInstanceUID": str(ds.StudyInstanceUID),
            "ReferencedSeriesInstanceUID": image_id,
            "stamp": seg_stamp(ds),
        }
        self.seg_index.remember(seg["SeriesInstanceUID"], image_id, seg["stamp"], seg["StudyInstanceUID"])
        return seg

    def put_label(self, image_id: str, tag: str, src: str, info: dict) -> None:
        """Into the cache, atomically, replacing the image's label of that tag in any format."""
        self._write_label(image_id, tag, src, volume_suffix(src) or NIFTI, dict(info, saved_at=time.time()))

    def drop_label(self, image_id: str, tag: str) -> None:
        label_dir = self._datastore.label_path(tag)
        with self._index_transaction():
            for ext in VOLUME_SUFFIXES:
                path = os.path.join(label_dir, f"{image_id}{ext}")
                if os.path.exists(path):
                    os.unlink(path)
            obj = self._datastore.objects.get(image_id)
            if obj is not None:
                obj.labels.pop(tag, None)
            self._update_datastore_file(lock=False)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_tag(label_tag)
        check_uid(label_id)
        if label_tag == FINAL:
            raise HTTPException(
                405, "a final label is a DICOM SEG series on the PACS, which DICOMweb cannot delete: remove the SEG "
                "series on the PACS (or save a corrected label, which supersedes it); the next start-up follows",
            )
        if not LocalDatastore.get_label_uri(self, label_id, label_tag):
            raise HTTPException(404, f"series {label_id} has no {label_tag!r} label")
        self.drop_label(label_id, label_tag)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        check_info(info, "info", RESERVED_INFO_KEYS + DICOM_INFO_KEYS)
        check_tag(label_tag)
        check_uid(label_id)
        if not LocalDatastore.get_label_uri(self, label_id, label_tag):
            raise HTTPException(404, f"series {label_id} has no {label_tag!r} label")
        LocalDatastore.update_label_info(self, label_id, label_tag, info)
