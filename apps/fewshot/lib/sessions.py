"""MONAI Label's sessions (images a client sends for inference without adding them to the datastore),
with the ids and archives checked.

Stock 0.8.5 joins the session id from the URL onto its store path (``GET /session/../..`` writes a
``meta.info`` wherever that lands, ``DELETE`` runs ``rmtree`` there) and unpacks uploaded archives
with ``shutil.unpack_archive``, which on Python 3.11 follows ``../`` and absolute member names out
of the extraction folder (a tar can overwrite a final label). Here a session id must be a plain
name, and an archive is unpacked member by member into a private folder: tar through the ``data``
filter, zip with every name checked; anything that would land outside is refused with a 400 and
nothing is kept.
"""
from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
import zipfile

from fastapi import HTTPException
from monailabel.utils.sessions import Sessions

from lib.validation import check_id

logger = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def _check_member(name: str, archive: str) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise HTTPException(400, f"{archive}: member {name!r} would be written outside the session folder; archive refused")


def extract_archive(archive: str, dest: str) -> None:
    """Unpack ``archive`` into ``dest`` (an empty folder of ours), refusing any escaping member."""
    name = os.path.basename(archive)
    lower = name.lower()
    try:
        if lower.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for member in zf.infolist():
                    _check_member(member.filename, name)
                zf.extractall(dest)
        elif lower.endswith(TAR_SUFFIXES):
            with tarfile.open(archive) as tf:
                for member in tf.getmembers():
                    _check_member(member.name, name)
                # The data filter also refuses links out of dest, device files and unsafe modes.
                tf.extractall(dest, filter="data")
        else:
            raise HTTPException(415, f"{name}: not an archive this server unpacks (.zip, {', '.join(TAR_SUFFIXES)})")
    except tarfile.FilterError as exc:
        raise HTTPException(400, f"{name}: {exc}; archive refused") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise HTTPException(422, f"{name}: not a readable archive ({exc})") from None


class SafeSessions(Sessions):
    def _check(self, session_id) -> str:
        return check_id(session_id, "session id")

    def get_session(self, session_id: str, update_ts: bool = True, fetch_cache: bool = True):
        return super().get_session(self._check(session_id), update_ts=update_ts, fetch_cache=fetch_cache)

    def remove_session(self, session_id: str):
        return super().remove_session(self._check(session_id))

    def add_session(self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id=None):
        if session_id is not None:
            self._check(session_id)
        if not uncompress or os.path.isdir(data_file):
            return super().add_session(data_file, expiry, uncompress=False, session_id=session_id)
        folder = tempfile.mkdtemp(prefix="fewshot-session-")
        try:
            extract_archive(data_file, folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        logger.info("session archive %s unpacked into %s", os.path.basename(data_file), folder)
        # Stock add_session moves a folder into the session store as the session's image (a DICOM series).
        return super().add_session(folder, expiry, uncompress=False, session_id=session_id)
