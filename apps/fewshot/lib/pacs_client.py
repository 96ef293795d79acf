"""The DICOMweb connection to the PACS, and nothing of labels, the datastore or the bank: the client
MONAI Label would build (without the dcmqi download that follows it there), where this server caches
a PACS's series, what an image id must look like (a SeriesInstanceUID), the listing of image series
(QIDO-RS, reused for ``LIST_TTL`` seconds, a failure remembered for ``LIST_FAILURE_TTL``) and the
download of one series (WADO-RS). Every PACS failure is a ``PacsError`` (502: nothing was changed here).
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Dict

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX
from monailabel.datastore.utils.dicom import dicom_web_download_series
from monailabel.utils.others.generic import md5_digest

from fewshot.dicomweb import UID_PATTERN, image_series, is_url  # the engine's: one definition of an image series

logger = logging.getLogger(__name__)

LIST_TTL = 30.0  # seconds a listing of the PACS's series is reused (new series show up after this)
RELIST_MIN_INTERVAL = 2.0  # an unknown id refreshes the listing at most this often
LIST_FAILURE_TTL = 10.0  # seconds a failed listing is reported as is, without asking the PACS again


class PacsError(HTTPException):
    """The PACS could not be reached or refused a request: 502, nothing was changed here."""

    def __init__(self, message: str):
        super().__init__(502, message)


def is_dicomweb(studies: Any) -> bool:
    return is_url(studies)  # the engine's test, so the app and `fewshot batch` agree on what a PACS URL is


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


def http_detail(exc: Exception) -> str:
    return exc.detail if isinstance(exc, HTTPException) else f"{type(exc).__name__}: {exc}"


def download_series(client, study: str, series: str, dest: Path, fetch_by_frame: bool = False) -> None:
    """A series' instances into the folder ``dest``; a PacsError when the PACS fails or returns none."""
    try:
        dicom_web_download_series(study or None, series, str(dest), client, fetch_by_frame)
    except Exception as exc:
        raise PacsError(f"series {series} could not be downloaded from the PACS ({type(exc).__name__}: {exc})") from None
    if not dest.is_dir() or not any(dest.iterdir()):
        raise PacsError(f"the PACS returned no instances for series {series}")


class SeriesListing:
    """The PACS's image series matching the search filter (SEG and other non-image series never are)."""

    def __init__(self, client, search_filter: Dict[str, Any]):
        self.client = client
        self.search_filter = dict(search_filter or {})
        self._listing: dict[str, dict] = {}
        self._listed_at = 0.0
        self._list_failure: tuple[float, str] | None = None  # when the PACS last could not be listed, and why
        self._lock = threading.Lock()

    def series(self, refresh: bool = False) -> dict[str, dict]:
        """SeriesInstanceUID -> QIDO attributes of the image series matching the search filter."""
        with self._lock:
            if self._listed_at and not refresh and time.time() - self._listed_at < LIST_TTL:
                return self._listing
            if not refresh and self._list_failure and time.time() - self._list_failure[0] < LIST_FAILURE_TTL:
                if self._listed_at:
                    return self._listing
                raise PacsError(self._list_failure[1])
            try:
                found = self.client.search_for_series(search_filters=self.search_filter, get_remaining=True)
            except Exception as exc:
                message = f"the PACS at {self.client.base_url} cannot be searched ({type(exc).__name__}: {exc})"
                self._list_failure = (time.time(), message)
                if self._listed_at:
                    logger.warning("PACS: listing series failed (%s); using the list from %.0f s ago", exc, time.time() - self._listed_at)
                    return self._listing
                raise PacsError(message) from None
            self._list_failure = None
            listing = {}
            for item in found:
                try:
                    series = image_series(item)  # the engine's parsing (the batch lists a PACS the same way)
                except Exception as exc:  # one malformed answer must not hide the other series
                    logger.warning("PACS: a series entry could not be read (%s); skipped", exc)
                    continue
                if series is None:
                    continue
                listing[series.series] = {
                    "SeriesInstanceUID": series.series,
                    "StudyInstanceUID": series.study,
                    "Modality": series.modality,
                    "PatientID": series.patient,
                    "SeriesDescription": series.description,
                }
            self._listing, self._listed_at = listing, time.time()
            return listing

    def listed(self, image_id: str) -> dict:
        """The series' QIDO attributes; 404 when the PACS has no such image series."""
        check_uid(image_id)
        listing = self.series()
        if image_id not in listing and time.time() - self._listed_at > RELIST_MIN_INTERVAL:
            listing = self.series(refresh=True)  # a series sent to the PACS a moment ago
        if image_id not in listing:
            raise HTTPException(
                404, f"unknown image id {image_id!r}: the PACS has no image series with this SeriesInstanceUID "
                f"matching the search filter {self.search_filter}",
            )
        return listing[image_id]
