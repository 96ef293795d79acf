"""What a batch segments: a folder, a list file or a DICOMweb URL, turned into cases with stable ids.

A case id is the input's path relative to the folder (or to the list file's common parent),
without its image suffix, or a series' SeriesInstanceUID: it names the output
(``<output>/<id>.nii.gz``) and the manifest record, so it must stay the same from one run to the
next for resuming to work. A DICOMweb case's path is its series URI (``fewshot.dicomweb``); the
worker downloads the series when it segments it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from fewshot import dicomweb
from fewshot.folders import image_id_of
from fewshot.volume import IMAGE_SUFFIXES


class InputError(ValueError):
    """Inputs that cannot be listed; the message says which and why."""


@dataclass(frozen=True)
class Case:
    case_id: str  # relative name, "/"-separated: also the output's path under --output
    path: str  # absolute path of an image file or of a DICOM series folder


is_url = dicomweb.is_url


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(IMAGE_SUFFIXES)


def _is_series(path: Path) -> bool:
    """A folder of DICOM files (one series), e.g. as a PACS export lays them out."""
    return path.is_dir() and not path.name.startswith(".") and any(
        f.is_file() and (f.suffix.lower() == ".dcm" or not f.suffix) for f in path.iterdir())


def _case_id(path: Path, root: Path) -> str:
    rel = path.relative_to(root)
    name = image_id_of(rel.name) if path.is_file() else rel.name
    return "/".join((*rel.parts[:-1], name))


def from_folder(folder: str | os.PathLike) -> list[Case]:
    """Image files at the top of ``folder`` and its DICOM series subfolders (not recursive: a
    datastore's ``labels/`` and ``.fewshot/`` sit beside its images)."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise InputError(f"{folder}: no such folder")
    paths = sorted(p for p in root.iterdir() if _is_image(p) or _is_series(p))
    return _unique([Case(_case_id(p, root), str(p)) for p in paths], str(folder))


def from_list(list_file: str | os.PathLike) -> list[Case]:
    """One image file or DICOM folder per line; blank lines and ``#`` comments skipped; relative
    paths are relative to the list file. Ids are paths relative to the inputs' common parent."""
    listing = Path(list_file).resolve()
    paths = []
    for n, line in enumerate(listing.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = (listing.parent / line).resolve()
        if not (path.is_file() or path.is_dir()):
            raise InputError(f"{list_file}:{n}: {line}: no such file or folder")
        paths.append(path)
    if not paths:
        return []
    parents = [p.parent for p in paths]
    root = Path(os.path.commonpath([str(p) for p in parents]))
    return _unique([Case(_case_id(p, root), str(p)) for p in dict.fromkeys(paths)], str(list_file))


def _unique(cases: list[Case], source: str) -> list[Case]:
    seen: dict[str, str] = {}
    for case in cases:
        if case.case_id in seen:
            raise InputError(f"{source}: {seen[case.case_id]} and {case.path} would both be written as "
                             f"{case.case_id!r}; rename one")
        seen[case.case_id] = case.path
    return cases


def from_dicomweb(url: str) -> list[Case]:
    """Every image series the URL names (a DICOMweb root, with QIDO filters as query parameters; a
    study; a series), one case each, named by its SeriesInstanceUID."""
    try:
        return [Case(series.series, uri) for uri, series in dicomweb.list_series(url)]
    except dicomweb.DicomWebError as exc:
        raise InputError(str(exc)) from None


def collect(source: str | os.PathLike) -> list[Case]:
    """Cases from a folder, a list file or a DICOMweb URL."""
    if is_url(str(source)):
        return from_dicomweb(str(source))
    path = Path(source)
    if path.is_dir():
        return from_folder(path)
    if path.is_file() and not path.name.lower().endswith(IMAGE_SUFFIXES):
        return from_list(path)
    raise InputError(f"{source}: expected a folder of images, a text file listing them (one per line) or a "
                     "DICOMweb URL")


def input_stamp(path: str | os.PathLike) -> str:
    """A cheap "unchanged" for a file (size, mtime), a series folder (each file's name, size, mtime)
    or a series on a DICOMweb server (its instances' UIDs: one request)."""
    if is_url(path):
        return dicomweb.series_stamp(str(path))
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "dir:" + h.hexdigest()[:24]
