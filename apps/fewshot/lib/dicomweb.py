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
for ingestion. At start-up :meth:`sync_with_pacs` brings the cache in step with the PACS: for
each image series the latest SEG that references it is its final label (a PACS keeps every saved
version); new or newer ones are fetched, converted and checked, cached labels whose SEG is gone
are dropped, and the listener (the ingestion worker) is told of each change. A final label cannot
be deleted through this server: DICOMweb has no delete.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import nibabel as nib
import numpy as np
import pydicom
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.datastore.utils.colors import GENERIC_ANATOMY_COLORS
from monailabel.datastore.utils.convert import dicom_to_nifti, nifti_to_dicom_seg
from monailabel.datastore.utils.dicom import dicom_web_download_series
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.utils.others.generic import md5_digest
from pydicom.dataset import Dataset

from fewshot.annotation import Annotation
from fewshot.volume import VolumeError, label_nifti, read_volume
from lib import annotations
from lib.datastore import AtomicIndexMixin, FinalLabelListener, without_provenance
from lib.labels import client_segments
from lib.validation import RESERVED_INFO_KEYS, VOLUME_SUFFIXES, UploadValidator, check_info, check_tag, volume_suffix

logger = logging.getLogger(__name__)

FINAL = DefaultLabelTag.FINAL.value
NIFTI = ".nii.gz"
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# Series that are not volumes to segment, even when the search filter lets them through.
NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "SR", "PR", "KO", "REG", "RTPLAN", "RTDOSE", "RTRECORD", "DOC"}
LIST_TTL = 30.0  # seconds a listing of the PACS's series is reused (new series show up after this)
SYNC_RETRY_DELAYS = (5.0, 15.0, 60.0, 300.0)  # seconds before each new start-up sync while the PACS is unreachable
RELIST_MIN_INTERVAL = 2.0  # an unknown id refreshes the listing at most this often
LIST_FAILURE_TTL = 10.0  # seconds a failed listing is reported as is, without asking the PACS again
SEG_SERIES_DESCRIPTION = "Few-shot app: final label"
# Keys this datastore records in a label's info; a client's params may not set them.
DICOM_INFO_KEYS = ("dicom_seg", "saved_at", "source")
DEFAULT_COLOR = (255, 0, 0)
STATE_SUBDIR = Path(".fewshot") / "dicomweb"


class PacsError(HTTPException):
    """The PACS could not be reached or refused a request: 502, nothing was changed here."""

    def __init__(self, message: str):
        super().__init__(502, message)


def is_dicomweb(studies: Any) -> bool:
    return str(studies).strip().lower().startswith(("http://", "https://"))


def make_client(url: str):
    """The DICOMweb client MONAI Label builds in ``_init_dicomweb_datastore`` (same settings: the
    QIDO/WADO/STOW prefixes, username and password, Google Cloud credentials), without the dcmqi
    download that follows it there."""
    from dicomweb_client import DICOMwebClient

    if "googleapis.com" in url:
        from dicomweb_client.ext.gcp.session_utils import create_session_from_gcp_credentials

        return _fail_fast(DICOMwebClient(url=url, session=create_session_from_gcp_credentials()))
    user = settings.MONAI_LABEL_DICOMWEB_USERNAME or settings.MONAI_LABEL_DATASTORE_USERNAME
    password = settings.MONAI_LABEL_DICOMWEB_PASSWORD or settings.MONAI_LABEL_DATASTORE_PASSWORD
    session = None
    if user and password:
        from dicomweb_client.session_utils import create_session_from_user_pass

        session = create_session_from_user_pass(user, password)
    return _fail_fast(DICOMwebClientX(
        url=url,
        session=session,
        qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
        wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
        stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
    ))


def _fail_fast(client):
    """dicomweb-client retries every failed request 5 times over 30 s, a refused connection
    included; a client waiting on an unreachable PACS gets its 502 after one quick retry instead
    (the start-up sync retries on its own schedule)."""
    client.set_http_retry_params(retry=True, max_attempts=2, wait_exponential_multiplier=250)
    return client


def cache_root(client) -> Path:
    """Where MONAI Label's DICOMWebDatastore caches this server's series (same folder)."""
    base = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or settings.MONAI_LABEL_DATASTORE_CACHE_PATH or "").strip()
    digest = md5_digest(client.base_url)
    return Path(base, digest) if base else Path.home() / ".cache" / "monailabel" / "dicom" / digest


def check_uid(value: Any, what: str = "image id") -> str:
    if not isinstance(value, str) or not UID_PATTERN.match(value) or len(value) > 64:
        raise HTTPException(
            400, f"invalid {what} {value!r}: with a DICOMweb datastore, image ids are SeriesInstanceUIDs "
            "(digits and dots, at most 64 characters)",
        )
    return value


def _stamp(ds: Dataset) -> str:
    """When a SEG was made, as a sortable string (its Series, else Content, else Instance Creation date and time)."""
    for date_key, time_key in (("SeriesDate", "SeriesTime"), ("ContentDate", "ContentTime"), ("InstanceCreationDate", "InstanceCreationTime")):
        date = str(ds.get(date_key, "") or "").strip()
        if date:
            whole, _, fraction = str(ds.get(time_key, "") or "").strip().partition(".")
            return f"{date}{whole.ljust(6, '0')}.{fraction.ljust(6, '0')}"
    return ""


def seg_frame_slices(ds: Dataset, image_path: str) -> list[int]:
    """The image slice (index along the series' third voxel axis) of each frame of a SEG, in frame order."""
    import SimpleITK as sitk

    ref = sitk.ReadImage(image_path)
    out = []
    for item in ds.get("PerFrameFunctionalGroupsSequence") or []:
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        out.append(int(round(ref.TransformPhysicalPointToContinuousIndex(position)[2])))
    return out


def _keep_frames(ds: Dataset, frame_slices: list[int], keep: set[int]) -> None:
    """Drops a binary SEG's frames whose slice is not in ``keep`` (1-bit frames are packed end to end)."""
    from pydicom.pixel_data_handlers.numpy_handler import pack_bits

    chosen = [i for i, z in enumerate(frame_slices) if z in keep]
    if len(chosen) == len(frame_slices):
        return
    frames = ds.pixel_array.reshape(len(frame_slices), int(ds.Rows), int(ds.Columns))
    items = list(ds.PerFrameFunctionalGroupsSequence)
    ds.PixelData = pack_bits(np.ascontiguousarray(frames[chosen]).ravel())
    ds.NumberOfFrames = len(chosen)
    ds.PerFrameFunctionalGroupsSequence = [items[i] for i in chosen]


def _http_detail(exc: Exception) -> str:
    return exc.detail if isinstance(exc, HTTPException) else f"{type(exc).__name__}: {exc}"


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
        self._client = client
        self._search_filter = dict(search_filter or {})
        self._fetch_by_frame = fetch_by_frame
        self._convert_to_nifti = True
        self.validator = validator
        self.listener = listener
        self.live = live
        root = Path(cache_path)
        self.state_dir = root / STATE_SUBDIR
        self.scratch = self.state_dir / "scratch"
        self._refs_path = self.state_dir / "seg-series.json"
        self._listing: dict[str, dict] = {}
        self._listed_at = 0.0
        self._list_failure: tuple[float, str] | None = None  # when the PACS last could not be listed, and why
        self._listing_lock = threading.Lock()
        self._series_locks: dict[str, threading.Lock] = {}
        self._series_locks_lock = threading.Lock()
        # Held while a final label is written or dropped in the cache: user saves vs. the PACS sync.
        self._labels_lock = threading.RLock()
        self._refs_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._sync: dict = {"state": "not started"}
        self._unusable: dict[str, str] = {}  # SEG series uid -> why it cannot be used (sync_with_pacs)
        logger.info("DICOMweb datastore %s; cache %s; search filter %s", client.base_url, root, self._search_filter)
        LocalDatastore.__init__(
            self, str(root), extensions=[f"*{s}" for s in VOLUME_SUFFIXES], auto_reload=False, read_only=not live
        )
        if live:
            self._remove_stale_tmp()
            shutil.rmtree(self.scratch, ignore_errors=True)  # a killed download or conversion
        self.scratch.mkdir(parents=True, exist_ok=True)
        self._seg_refs = self._load_seg_refs()

    # ------------------------------------------------------------------ the PACS's series

    def _series(self, refresh: bool = False) -> dict[str, dict]:
        """SeriesInstanceUID -> QIDO attributes of the image series matching the search filter."""
        with self._listing_lock:
            if self._listed_at and not refresh and time.time() - self._listed_at < LIST_TTL:
                return self._listing
            if not refresh and self._list_failure and time.time() - self._list_failure[0] < LIST_FAILURE_TTL:
                if self._listed_at:
                    return self._listing
                raise PacsError(self._list_failure[1])
            try:
                found = self._client.search_for_series(search_filters=self._search_filter, get_remaining=True)
            except Exception as exc:
                message = f"the PACS at {self._client.base_url} cannot be searched ({type(exc).__name__}: {exc})"
                self._list_failure = (time.time(), message)
                if self._listed_at:
                    logger.warning("PACS: listing series failed (%s); using the list from %.0f s ago", exc, time.time() - self._listed_at)
                    return self._listing
                raise PacsError(message) from None
            self._list_failure = None
            listing = {}
            for item in found:
                try:
                    ds = Dataset.from_json(item)
                except Exception as exc:  # one malformed answer must not hide the other series
                    logger.warning("PACS: a series entry could not be read (%s); skipped", exc)
                    continue
                uid = str(ds.get("SeriesInstanceUID", "") or "")
                modality = str(ds.get("Modality", "") or "").upper()
                if not UID_PATTERN.match(uid) or modality in NON_IMAGE_MODALITIES:
                    continue
                listing[uid] = {
                    "SeriesInstanceUID": uid,
                    "StudyInstanceUID": str(ds.get("StudyInstanceUID", "") or ""),
                    "Modality": modality,
                    "PatientID": str(ds.get("PatientID", "") or ""),
                    "SeriesDescription": str(ds.get("SeriesDescription", "") or ""),
                }
            self._listing, self._listed_at = listing, time.time()
            return listing

    def _listed(self, image_id: str) -> dict:
        """The series' QIDO attributes; 404 when the PACS has no such image series."""
        check_uid(image_id)
        listing = self._series()
        if image_id not in listing and time.time() - self._listed_at > RELIST_MIN_INTERVAL:
            listing = self._series(refresh=True)  # a series sent to the PACS a moment ago
        if image_id not in listing:
            raise HTTPException(
                404, f"unknown image id {image_id!r}: the PACS has no image series with this SeriesInstanceUID "
                f"matching the search filter {self._search_filter}",
            )
        return listing[image_id]

    def list_images(self) -> List[str]:
        return sorted(self._series())

    def _cached_finals(self) -> set[str]:
        objects = list(self._datastore.objects.items())  # a snapshot: saves and the sync add to it
        return {k for k, v in objects if v.labels.get(FINAL)}

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        finals = self._cached_finals()
        return [i for i in self.list_images() if i in finals]

    def get_unlabeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        finals = self._cached_finals()
        return [i for i in self.list_images() if i not in finals]

    def datalist(self, full_path=True) -> List[Dict[str, Any]]:
        return LocalDatastore.datalist(self, full_path)  # the cache, kept in step by saves and the sync

    def status(self) -> Dict[str, Any]:
        try:
            status = LocalDatastore.status(self)
        except PacsError as exc:  # /info must answer while the PACS is down
            status = {"total": len(self._datastore.objects), "completed": len(self._cached_finals()), "error": exc.detail}
        status["pacs"] = self.sync_status()
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
        return self._fetch_series(image_id, self._listed(image_id))

    def _series_lock(self, image_id: str) -> threading.Lock:
        with self._series_locks_lock:
            return self._series_locks.setdefault(image_id, threading.Lock())

    def _download(self, study: str, series: str, dest: Path) -> None:
        try:
            dicom_web_download_series(study or None, series, str(dest), self._client, self._fetch_by_frame)
        except Exception as exc:
            raise PacsError(f"series {series} could not be downloaded from the PACS ({type(exc).__name__}: {exc})") from None
        if not dest.is_dir() or not any(dest.iterdir()):
            raise PacsError(f"the PACS returned no instances for series {series}")

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
                self._download(listed.get("StudyInstanceUID", ""), image_id, dicom_dir)
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
                        self._download(self._listed(image_id).get("StudyInstanceUID", ""), image_id, work / "dicom")
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

    def _final_info(self, image_id: str) -> dict | None:
        obj = self._datastore.objects.get(image_id)
        label = obj.labels.get(FINAL) if obj else None
        if label is None or not os.path.isfile(os.path.join(self._datastore.label_path(FINAL), f"{image_id}{label.ext}")):
            return None
        return dict(label.info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any], label_id: str = "") -> str:
        check_tag(label_tag)
        info = without_provenance(dict(check_info({} if label_info is None else label_info, "params", RESERVED_INFO_KEYS + DICOM_INFO_KEYS)))
        image_path = self.get_image_uri(image_id)
        started = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix="label-", dir=self.scratch))
        stored = upload = label_filename
        try:
            if label_filename.lower().endswith(".bin"):
                upload = self._raw_to_nifti(image_id, image_path, label_filename, work / f"label{NIFTI}")
            stored = self.validator.check_label(image_id, image_path, upload, client_segments(info))
            annotation = annotations.parse(info, self.validator.label_map(), stored)
            if annotation is not None:
                info[annotations.INFO_KEY] = annotation.as_dict()
            if label_tag == FINAL:
                info["dicom_seg"] = self._store_seg(image_id, stored, work, annotation)
                info["source"] = "saved"
            with self._labels_lock:
                self._put_label(image_id, label_tag, stored, info)
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

    def _raw_to_nifti(self, image_id: str, image_path: str, raw_path: str, out: Path) -> str:
        """OHIF's ``label.bin``: the viewer's label buffer, x fastest, on the series' voxel grid
        (read as MONAI Label's binary_to_image reads it), written as NIfTI with the image's geometry."""
        image = nib.load(image_path)
        shape = tuple(int(s) for s in image.shape[:3])
        voxels = int(np.prod(shape))
        size = os.path.getsize(raw_path)
        dtype = {voxels: np.dtype(np.uint8), 2 * voxels: np.dtype("<u2")}.get(size)
        if dtype is None:
            raise HTTPException(
                422, f"the uploaded raw label for {image_id!r} has {size} bytes; series {image_id} has {shape} voxels, "
                f"so its raw label (label.bin) has {voxels} bytes (uint8) or {2 * voxels} (uint16)",
            )
        data = np.fromfile(raw_path, dtype=dtype).reshape(shape, order="F")
        nib.save(label_nifti(data, image.affine, image.header), out)
        return str(out)

    def _store_seg(self, image_id: str, label_path: str, work: Path, annotation: Annotation | None = None) -> dict:
        """The label as a DICOM SEG referencing its series, stored on the PACS (STOW-RS). Every slice
        gets a frame per segment (an empty frame says "annotated, nothing there"), except the slices
        a partial label leaves unannotated: those get none, which is how any reader tells."""
        import SimpleITK as sitk

        values = [int(v) for v in np.unique(sitk.GetArrayFromImage(sitk.ReadImage(label_path))) if v]
        if not values:
            raise HTTPException(422, f"the label for {image_id!r} is empty: a final label needs at least one labelled voxel (a DICOM SEG holds segments)")
        series_dir = self._series_dir(image_id)
        names = {int(v): n for n, v in self.validator.label_map().items()}
        # One entry per value present, in the order nifti_to_dicom_seg reads them (sorted values).
        segments = []
        for value in values:
            name = names.get(value, str(value))
            color = GENERIC_ANATOMY_COLORS.get(name) or GENERIC_ANATOMY_COLORS.get(name.replace("_", " ")) or DEFAULT_COLOR
            segments.append({"name": name, "description": name, "color": list(color), "model_name": SEG_SERIES_DESCRIPTION})
        try:
            seg_file = nifti_to_dicom_seg(str(series_dir), label_path, segments, use_itk=False)
        except Exception as exc:
            raise HTTPException(422, f"the label for {image_id!r} cannot be encoded as DICOM SEG ({type(exc).__name__}: {exc})") from None
        if not seg_file:  # its way of saying it found no segment
            raise HTTPException(422, f"the label for {image_id!r} cannot be encoded as DICOM SEG: no segment found in it")
        try:
            ds = pydicom.dcmread(seg_file)
        finally:
            os.unlink(seg_file)
        if annotation is not None and annotation.slices is not None and annotation.axis == 2:
            _keep_frames(ds, seg_frame_slices(ds, label_path), set(annotation.slices))
        source = pydicom.dcmread(str(next(series_dir.iterdir())), stop_before_pixels=True)
        # pydicom-seg gives the SEG a new frame of reference; viewers (OHIF) overlay a SEG on the
        # series sharing its frame of reference.
        if source.get("FrameOfReferenceUID"):
            ds.FrameOfReferenceUID = source.FrameOfReferenceUID
        ds.SeriesDescription = SEG_SERIES_DESCRIPTION
        try:
            response = self._client.store_instances([ds])
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
            "stamp": _stamp(ds),
        }
        self._remember_seg(seg["SeriesInstanceUID"], image_id, seg["stamp"], seg["StudyInstanceUID"])
        return seg

    def _put_label(self, image_id: str, tag: str, src: str, info: dict) -> None:
        """Into the cache, atomically, replacing the image's label of that tag in any format."""
        self._write_label(image_id, tag, src, volume_suffix(src) or NIFTI, dict(info, saved_at=time.time()))

    def _drop_label(self, image_id: str, tag: str) -> None:
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
        self._drop_label(label_id, label_tag)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        check_info(info, "info", RESERVED_INFO_KEYS + DICOM_INFO_KEYS)
        check_tag(label_tag)
        check_uid(label_id)
        if not LocalDatastore.get_label_uri(self, label_id, label_tag):
            raise HTTPException(404, f"series {label_id} has no {label_tag!r} label")
        LocalDatastore.update_label_info(self, label_id, label_tag, info)

    # ------------------------------------------------------------------ SEG series on the PACS

    def _load_seg_refs(self) -> dict[str, dict]:
        """SEG SeriesInstanceUID -> the series it labels and when it was made. DICOM instances
        never change, so this is read from each SEG's metadata once, then kept here."""
        try:
            data = json.loads(self._refs_path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _remember_seg(self, seg_uid: str, image_id: str | None, stamp: str, study: str) -> None:
        with self._refs_lock:
            self._seg_refs[seg_uid] = {"image": image_id, "stamp": stamp, "study": study}
            if not self.live:
                return
            self.state_dir.mkdir(parents=True, exist_ok=True)
            tmp = self._refs_path.with_name(f".{self._refs_path.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps(self._seg_refs, indent=1, sort_keys=True))
            os.replace(tmp, self._refs_path)

    def _latest_segs(self, listing: dict[str, dict]) -> dict[str, dict]:
        """Image series -> its latest SEG series on the PACS (uid, study, stamp)."""
        try:
            found = self._client.search_for_series(search_filters={"Modality": "SEG"}, get_remaining=True)
        except Exception as exc:
            raise PacsError(f"the PACS's SEG series cannot be listed ({type(exc).__name__}: {exc})") from None
        latest: dict[str, dict] = {}
        for item in found:
            ds = Dataset.from_json(item)
            seg_uid, study = str(ds.get("SeriesInstanceUID", "") or ""), str(ds.get("StudyInstanceUID", "") or "")
            with self._refs_lock:
                ref = self._seg_refs.get(seg_uid)
            if ref is None:
                try:
                    meta = Dataset.from_json(self._client.retrieve_series_metadata(study, seg_uid)[0])
                except Exception as exc:
                    logger.warning("PACS: metadata of SEG series %s unreadable (%s); skipped this time", seg_uid, exc)
                    continue
                refs = meta.get("ReferencedSeriesSequence") or []
                image = str(refs[0].get("SeriesInstanceUID", "")) if refs else None
                if not image:
                    logger.warning("PACS: SEG series %s references no image series; ignored", seg_uid)
                self._remember_seg(seg_uid, image or None, _stamp(meta), study)
                with self._refs_lock:
                    ref = self._seg_refs[seg_uid]
            image = ref.get("image")
            if image not in listing:
                continue
            candidate = {"uid": seg_uid, "study": ref.get("study") or study, "stamp": ref.get("stamp", "")}
            best = latest.get(image)
            if best is None or (candidate["stamp"], candidate["uid"]) > (best["stamp"], best["uid"]):
                latest[image] = candidate
        return latest

    def _seg_to_label(self, image_id: str, image_path: str, seg_dir: Path, out: Path) -> str:
        """A SEG as a label on its image's voxel grid, segments numbered by the app's label values
        (a segment whose SegmentLabel names a label gets that label's value, others keep their number)."""
        import pydicom_seg
        import SimpleITK as sitk

        files = sorted(p for p in seg_dir.iterdir() if p.is_file())
        if len(files) != 1:
            raise HTTPException(422, f"SEG series of {image_id} has {len(files)} instances; one multi-frame SEG instance is expected")
        try:
            result = pydicom_seg.MultiClassReader().read(pydicom.dcmread(str(files[0])))
        except Exception as exc:
            raise HTTPException(422, f"SEG of series {image_id} cannot be read as a label map ({type(exc).__name__}: {exc})") from None
        seg, ref = result.image, sitk.ReadImage(image_path)
        # A SEG may hold only the slices that have segments: it must lie on the image's grid.
        offset = np.asarray(ref.TransformPhysicalPointToContinuousIndex(seg.GetOrigin()))
        aligned = (
            np.allclose(seg.GetSpacing(), ref.GetSpacing(), rtol=1e-3, atol=1e-3)
            and np.allclose(seg.GetDirection(), ref.GetDirection(), atol=1e-3)
            and np.allclose(offset, np.rint(offset), atol=1e-2)
        )
        if not aligned:
            raise HTTPException(
                422, f"SEG of series {image_id} does not lie on the series' voxel grid (spacing {seg.GetSpacing()} vs "
                f"{ref.GetSpacing()}, origin at voxel {np.round(offset, 3).tolist()})",
            )
        # The frames it holds are the slices that were annotated; a slice without one was not looked at.
        frames = set(seg_frame_slices(pydicom.dcmread(str(files[0]), stop_before_pixels=True), image_path))
        slices = None if frames >= set(range(ref.GetSize()[2])) else tuple(sorted(frames))
        on_grid = sitk.Resample(seg, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, seg.GetPixelID())
        numbers = sitk.GetArrayFromImage(on_grid).transpose(2, 1, 0).astype(np.int64)  # (x, y, z) as nibabel reads
        label_map = self.validator.label_map()
        table = np.arange(max(int(numbers.max(initial=0)), max(result.segment_infos, default=0)) + 1, dtype=np.int64)
        for number, segment in result.segment_infos.items():
            name = str(segment.get("SegmentLabel", "") or "")
            if name in label_map:
                table[int(number)] = int(label_map[name])
        image = nib.load(image_path)
        nib.save(label_nifti(table[numbers], image.affine, image.header), out)
        declared = {int(table[int(n)]) for n in result.segment_infos}
        labels = None if not label_map or declared >= set(label_map.values()) else tuple(sorted(declared))
        return str(out), Annotation(slices=slices, axis=2, labels=labels, how="SEG frames and segments")

    def sync_status(self) -> dict:
        with self._sync_lock:
            return json.loads(json.dumps(self._sync))

    def _set_sync(self, **changes) -> None:
        with self._sync_lock:
            self._sync.update(changes)

    def sync_until_done(self, keep_going: Callable[[], bool] = lambda: True, poll_seconds: float | None = None) -> None:
        """The start-up sync, retried while the PACS cannot be reached (meanwhile the cache's
        labels are used as they are); then, with ``poll_seconds``, the same sync every
        ``poll_seconds`` for as long as ``keep_going``: a SEG series stored, replaced or removed on
        the PACS by any tool (OHIF's export, another viewer, a script) reaches the cache and the bank
        within about that delay. A poll that finds nothing new costs two QIDO searches."""
        if poll_seconds:
            self._set_sync(poll_seconds=poll_seconds)  # in /info from the start: how soon a SEG is seen
        for attempt in itertools.count():
            if self.sync_with_pacs()["state"] == "done" or not keep_going():
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
            polls = self.sync_status().get("polls", 0) + 1
            self.sync_with_pacs(quiet=True)
            self._set_sync(polls=polls)

    def sync_with_pacs(self, quiet: bool = False) -> dict:
        """Bring the cache's final labels in step with the PACS's SEG series (start-up, then every
        poll). ``quiet``: a sync that changes nothing is logged at debug level (a poll)."""
        started = time.time()
        self._set_sync(state="syncing", started=time.strftime("%Y-%m-%dT%H:%M:%S"))
        try:
            listing = self._series(refresh=True)
            latest = self._latest_segs(listing)
        except Exception as exc:
            message = _http_detail(exc)
            logger.error("PACS: sync failed: %s; the cache's final labels are used as they are", message)
            self._set_sync(state="failed", error=message, attempts=self.sync_status().get("attempts", 0) + 1)
            return self.sync_status()
        fetched, removed, failed = [], [], {}
        for image_id in sorted(self._cached_finals() - set(latest)):
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
                failed[image_id] = f"SEG series {seg['uid']}: {_http_detail(exc)}"
                if not isinstance(exc, PacsError):  # unreadable, not unreachable
                    self._unusable[seg["uid"]] = failed[image_id]
                logger.error("PACS: final label of series %s not usable: %s", image_id, failed[image_id])
                # Whatever the cache holds for it is not the PACS's latest final label.
                if self._drop_final_if_older(image_id, started, "its latest SEG series is not usable"):
                    removed.append(image_id)
        seconds = round(time.time() - started, 2)
        changed = bool(fetched or removed) or failed != self.sync_status().get("failed", {})
        if quiet and not changed:  # a poll that found nothing new: the last changes stay on show
            self._set_sync(state="done", progress="", series=len(listing), labelled=len(latest), error=None,
                           retry_at=None, checked=time.strftime("%Y-%m-%dT%H:%M:%S"))
            return self.sync_status()
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
        return self.sync_status()

    def _fetch_final(self, image_id: str, seg: dict, started: float) -> bool:
        current = self._final_info(image_id)
        if current and (current.get("dicom_seg") or {}).get("SeriesInstanceUID") == seg["uid"]:
            return False
        if current and current.get("saved_at", 0) >= started:
            return False  # saved here since the PACS was listed: newer than what the listing saw
        image_path = self.get_image_uri(image_id)
        work = Path(tempfile.mkdtemp(prefix="seg-", dir=self.scratch))
        try:
            self._download(seg["study"], seg["uid"], work / "seg")
            label, annotation = self._seg_to_label(image_id, image_path, work / "seg", work / f"label{NIFTI}")
            stored = self.validator.check_label(image_id, image_path, label)
            with self._labels_lock:
                current = self._final_info(image_id)
                if current and current.get("saved_at", 0) >= started:
                    return False
                info = {
                    "source": "PACS",
                    "dicom_seg": {"SeriesInstanceUID": seg["uid"], "StudyInstanceUID": seg["study"], "ReferencedSeriesInstanceUID": image_id, "stamp": seg["stamp"]},
                }
                if annotation.partial:
                    info[annotations.INFO_KEY] = annotation.as_dict()
                self._put_label(image_id, FINAL, stored, info)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        logger.info("PACS: final label of series %s fetched from SEG series %s", image_id, seg["uid"])
        self.listener.final_label_saved(image_id, "final label fetched from the PACS")
        return True

    def _drop_final_if_older(self, image_id: str, started: float, why: str) -> bool:
        with self._labels_lock:
            current = self._final_info(image_id)
            if current is None or current.get("saved_at", 0) >= started:
                return False
            self._drop_label(image_id, FINAL)
        logger.info("PACS: cached final label of series %s dropped: %s", image_id, why)
        self.listener.final_label_removed(image_id)
        return True
