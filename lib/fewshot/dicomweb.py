"""Image series on a DICOMweb server (a PACS), read with dicomweb-client: list them (QIDO-RS), say
whether one changed, and download one into a folder of DICOM files (WADO-RS) for the volume reader.

The engine's side of DICOMweb, with no MONAI Label in it: ``python -m fewshot batch URL`` reads its
cases through it, and the MONAI Label app's PACS client shares its series parsing. A series is
named by a URI ``<root>/studies/<StudyInstanceUID>/series/<SeriesInstanceUID>``; what a user may
pass is the DICOMweb root (every image series, narrowed by QIDO query parameters such as
``?Modality=MR``), one study or one series under it.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import parse_qsl, urlsplit, urlunsplit

UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# Series that are not volumes to segment, even when a search filter lets them through.
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "SR", "PR", "KO", "REG", "RTPLAN", "RTDOSE", "RTRECORD", "DOC"})
_PATH = re.compile(r"^(?P<root>.*?)/studies/(?P<study>[^/]+)(?:/series/(?P<series>[^/]+))?/?$")


class DicomWebError(OSError):
    """The server could not be reached, refused a request or returned nothing usable."""


def is_url(source: Any) -> bool:
    return str(source).strip().lower().startswith(("http://", "https://"))


@dataclass(frozen=True)
class Source:
    """What a DICOMweb URL asks for: a root, optionally one study or one series, and QIDO filters."""

    root: str
    study: str = ""
    series: str = ""
    filters: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, url: str) -> "Source":
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise DicomWebError(f"{url}: not a DICOMweb URL (http:// or https://)")
        path = parts.path.rstrip("/")
        match = _PATH.match(path)
        root_path, study, series = (match["root"], match["study"], match["series"] or "") if match else (path, "", "")
        for uid in (study, series):
            if uid and not UID_PATTERN.match(uid):
                raise DicomWebError(f"{url}: {uid!r} is not a DICOM UID")
        root = urlunsplit((parts.scheme, parts.netloc, root_path, "", ""))
        return cls(root, study, series, tuple(parse_qsl(parts.query)))


@dataclass(frozen=True)
class Series:
    """One image series as the server lists it."""

    study: str
    series: str
    modality: str = ""
    description: str = ""
    patient: str = ""

    def uri(self, root: str) -> str:
        return f"{root.rstrip('/')}/studies/{self.study}/series/{self.series}"


def image_series(item: Mapping) -> Series | None:
    """A QIDO-RS series entry (DICOM JSON) as a Series; None when it is not an image series (SEG and
    other non-image modalities) or has no valid SeriesInstanceUID. Raises ValueError when unreadable."""
    from pydicom.dataset import Dataset

    ds = Dataset.from_json(dict(item))
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    modality = str(ds.get("Modality", "") or "").upper()
    if not UID_PATTERN.match(uid) or modality in NON_IMAGE_MODALITIES:
        return None
    return Series(study=str(ds.get("StudyInstanceUID", "") or ""), series=uid, modality=modality,
                  description=str(ds.get("SeriesDescription", "") or ""), patient=str(ds.get("PatientID", "") or ""))


def parse_series_uri(uri: str) -> tuple[str, str, str]:
    """(root, study, series) of a series URI; DicomWebError when it does not name one series."""
    source = Source.parse(uri)
    if not (source.study and source.series):
        raise DicomWebError(f"{uri}: not a series URI (<root>/studies/<study>/series/<series>)")
    return source.root, source.study, source.series


_CLIENTS: dict[str, Any] = {}


def client(root: str):
    """One dicomweb-client per server and process; a failed request is retried twice, not for 30 s."""
    if root not in _CLIENTS:
        from dicomweb_client import DICOMwebClient

        c = DICOMwebClient(url=root)
        c.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=250)
        _CLIENTS[root] = c
    return _CLIENTS[root]


def _request(what: str, call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except DicomWebError:
        raise
    except Exception as exc:  # requests' and dicomweb-client's own errors, as one kind
        raise DicomWebError(f"{what}: {type(exc).__name__}: {exc}") from None


def list_series(url: str) -> list[tuple[str, Series]]:
    """(series URI, Series) for every image series the URL names, in a stable order (by study, series)."""
    source = Source.parse(url)
    c = client(source.root)
    filters = dict(source.filters)
    found = _request(f"{source.root} could not be searched", c.search_for_series,
                     study_instance_uid=source.study or None, search_filters=filters, get_remaining=True)
    out: dict[str, Series] = {}
    for item in found:
        try:
            series = image_series(item)
        except ValueError:
            continue  # one malformed answer must not hide the others
        if series is None or (source.series and series.series != source.series):
            continue
        if source.study and not series.study:
            series = Series(source.study, series.series, series.modality, series.description, series.patient)
        out[series.series] = series
    if source.series and source.series not in out:
        raise DicomWebError(f"{url}: the server has no image series {source.series}")
    ordered = sorted(out.values(), key=lambda s: (s.study, s.series))
    return [(s.uri(source.root), s) for s in ordered]


def instances_stamp(sop_uids: Iterable[str]) -> str:
    """A series' identity: its instances' SOPInstanceUIDs (DICOM gives a changed image a new one)."""
    uids = sorted(set(sop_uids))
    return f"dicomweb:{len(uids)}:" + hashlib.sha256("\n".join(uids).encode()).hexdigest()[:24]


def series_stamp(uri: str) -> str:
    """The stamp of the series as the server holds it now (one QIDO-RS request)."""
    root, study, series = parse_series_uri(uri)
    found = _request(f"{uri}: instances could not be listed", client(root).search_for_instances,
                     study_instance_uid=study, series_instance_uid=series, fields=["SOPInstanceUID"],
                     get_remaining=True)
    uids = [str(item.get("00080018", {}).get("Value", [""])[0]) for item in found]
    if not uids:
        raise DicomWebError(f"{uri}: the server has no instances of this series")
    return instances_stamp(uids)


def download(uri: str, dest: str | Path) -> str:
    """Every instance of the series into the folder ``dest`` (one file each); returns its stamp."""
    root, study, series = parse_series_uri(uri)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    uids = []

    def fetch():
        for n, ds in enumerate(client(root).iter_series(study, series)):
            uid = str(ds.get("SOPInstanceUID", "") or f"instance-{n}")
            ds.save_as(dest / f"{n:06d}.dcm", write_like_original=False)
            uids.append(uid)

    _request(f"{uri} could not be downloaded", fetch)
    if not uids:
        raise DicomWebError(f"{uri}: the server returned no instances")
    return instances_stamp(uids)
