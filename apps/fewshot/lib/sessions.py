"""MONAI Label's sessions (images a client sends for inference without adding them to the datastore),
with the ids and archives checked.

Stock 0.8.5 joins the session id from the URL onto its store path (``GET /session/../..`` writes a
``meta.info`` wherever that lands, ``DELETE`` runs ``rmtree`` there) and unpacks uploaded archives
with ``shutil.unpack_archive``, which on Python 3.11 follows ``../`` and absolute member names out
of the extraction folder (a tar can overwrite a final label). Here a session id must be a plain
name, and an archive is unpacked member by member into a private folder: tar through the ``data``
filter, zip with every name checked; anything that would land outside is refused with a 400 and
nothing is kept. An archive is also refused (413) before anything is unpacked when its members
add up to more bytes or files than ``ArchiveLimits`` allows (a 1 MB zip held 1 GB of zeros): the
sizes and count come from the archive's directory, and Python's zipfile and tarfile never write
more than a member's recorded size.
"""
from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Iterable

from fastapi import HTTPException
from monailabel.utils.sessions import Sessions

from lib.validation import check_id

logger = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


@dataclass(frozen=True)
class ArchiveLimits:
    """What one session archive may unpack to: ``-c session_max_unpacked_mb``, ``-c
    session_max_files`` (defaults and why in ``lib.app_config``)."""

    max_bytes: int
    max_files: int


def _check_limits(members: Iterable[tuple[str, int]], archive: str, limits: ArchiveLimits | None) -> None:
    """``members``: (name, unpacked bytes), read lazily, so a long archive is refused at the limit."""
    count = total = 0
    for name, size in members:
        _check_member(name, archive)
        count, total = count + 1, total + max(size, 0)
        if limits is None:
            continue
        if count > limits.max_files:
            raise HTTPException(413, f"{archive}: holds more than {limits.max_files} files, this server's limit for a session "
                                     "(-c session_max_files); archive refused")
        if total > limits.max_bytes:
            raise HTTPException(413, f"{archive}: unpacks to more than {limits.max_bytes >> 20} MB, this server's limit for a "
                                     "session (-c session_max_unpacked_mb); archive refused")


def _check_member(name: str, archive: str) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise HTTPException(400, f"{archive}: member {name!r} would be written outside the session folder; archive refused")


def extract_archive(archive: str, dest: str, limits: ArchiveLimits | None = None) -> None:
    """Unpack ``archive`` into ``dest`` (an empty folder of ours), refusing any escaping member and
    archives beyond ``limits`` (None: no limit; the app's session route always passes them)."""
    name = os.path.basename(archive)
    lower = name.lower()
    try:
        if lower.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                _check_limits(((m.filename, m.file_size) for m in zf.infolist()), name, limits)
                zf.extractall(dest)
        elif lower.endswith(TAR_SUFFIXES):
            with tarfile.open(archive) as tf:
                _check_limits(((m.name, m.size if m.isreg() else 0) for m in tf), name, limits)
                # The data filter also refuses links out of dest, device files and unsafe modes.
                tf.extractall(dest, filter="data")
        else:
            raise HTTPException(415, f"{name}: not an archive this server unpacks (.zip, {', '.join(TAR_SUFFIXES)})")
    except tarfile.FilterError as exc:
        raise HTTPException(400, f"{name}: {str(exc).replace(dest, 'the session folder')}; archive refused") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise HTTPException(422, f"{name}: not a readable archive ({exc})") from None


class SafeSessions(Sessions):
    def _check(self, session_id) -> str:
        return check_id(session_id, "session id")

    def get_session(self, session_id: str, update_ts: bool = True, fetch_cache: bool = True):
        return super().get_session(self._check(session_id), update_ts=update_ts, fetch_cache=fetch_cache)

    def remove_session(self, session_id: str):
        return super().remove_session(self._check(session_id))

    def add_session(self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id=None,
                    limits: ArchiveLimits | None = None):
        if session_id is not None:
            self._check(session_id)
        if not uncompress or os.path.isdir(data_file):
            return super().add_session(data_file, expiry, uncompress=False, session_id=session_id)
        folder = tempfile.mkdtemp(prefix="fewshot-session-")
        try:
            extract_archive(data_file, folder, limits)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        logger.info("session archive %s unpacked into %s", os.path.basename(data_file), folder)
        # Stock add_session moves a folder into the session store as the session's image (a DICOM series).
        return super().add_session(folder, expiry, uncompress=False, session_id=session_id)
