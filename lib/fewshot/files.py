"""The two file chores every room shares, each done one way (the engine's lowest level: it imports
nothing of the project, so the bank, the weights, the engine and the app all stand on it).

- **Writing a file no reader ever sees half written**: ``atomic_write`` (and ``write_text_atomic``,
  ``write_json_atomic``, ``copy_atomic`` over it) writes a temporary sibling, fsyncs it and renames it
  over the target, so a crash or a full disk leaves the old file or none, and a partial temporary
  file is removed. Temporary names fit a file name whatever the target's (``tmp_beside``) and match
  ``STALE_TMP``, so a folder's owner can sweep what a killed process left.
- **Knowing what a file holds without reading it again**: ``file_sha256`` (with ``remember=True``
  the digest is kept in the folder's ``.sha256-cache.json`` and trusted while ``stat_key`` — size,
  mtime, inode — is unchanged: a 900 MB checkpoint is hashed once, not at every start),
  ``content_sha256`` for a file or a series folder, and ``file_stamp``/``same_content`` for what the
  bank records of a source file and how it tells that file unchanged.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import IO, Iterator, Mapping

logger = logging.getLogger(__name__)

TMP_NAME_BYTES = 255 - len("..") - 32 - len(".tmp")  # what of a file's name its temporary sibling keeps
STALE_TMP = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp")  # a temporary sibling, whatever suffix it was given
CHECKSUM_CACHE = ".sha256-cache.json"  # per folder: file name -> size, mtime_ns, inode, sha256
LOG_HASHING_ABOVE = 50_000_000  # bytes: hashing a smaller file is too quick to mention


def _current_umask() -> int:
    umask = os.umask(0)  # the only portable way to read it is to set it: done once, at import
    os.umask(umask)
    return umask


_UMASK = _current_umask()


def default_mode(mode: int = 0o666) -> int:
    """The mode open() (0o666) or mkdir() (0o777) gives under this process's umask, read once at import
    (changing the umask to read it is not safe once threads run): for what mkstemp/mkdtemp make 0600/0700."""
    return mode & ~_UMASK


def default_file_mode() -> int:
    return default_mode(0o666)


# ------------------------------------------------------------------------------- atomic writes


def tmp_beside(path: str | os.PathLike, suffix: str = "") -> Path:
    """A fresh temporary name in ``path``'s folder that fits a file name (255 bytes) whatever the length
    of ``path``'s own name; ``suffix`` for writers that choose the format by it (``.nii.gz``, ``.npy``)."""
    path = Path(path)
    name = path.name.encode("utf-8", "surrogatepass")[:TMP_NAME_BYTES].decode("utf-8", "ignore")
    return path.with_name(f".{name or 'file'}.{uuid.uuid4().hex}.tmp{suffix}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in ``path`` durable (the folder's entry, not only the file's bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", *, fsync: bool = True,
                durable: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling of ``path`` for a writer that wants a file name (``nib.save``,
    ``np.save``); once the block ends, that file is fsynced and renamed over ``path``. If the block
    raises, nothing replaces ``path`` and the temporary file is removed. ``durable`` also fsyncs the
    folder, so the rename survives a power cut (the bank's commits). The file keeps the mode its
    writer gave it (the umask's, for ``open``)."""
    target = Path(path)
    tmp = tmp_beside(target, suffix)
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, target)
        if durable:
            fsync_dir(target.parent)
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, fsync: bool = True, durable: bool = False,
                 **open_kwargs) -> Iterator[IO]:
    """``with atomic_write(path) as f: f.write(...)``: as ``atomic_path``, for an open file."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes a whole new file ('w' or 'wb'), not {mode!r}")
    with atomic_path(path, fsync=False, durable=durable) as tmp:
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str, **kwargs) -> None:
    with atomic_write(path, "w", **kwargs) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, data, *, indent: int | None = 1, sort_keys: bool = False,
                      default=None, **kwargs) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys, default=default), **kwargs)


def copy_atomic(src: str | os.PathLike, dest: str | os.PathLike, **kwargs) -> None:
    """Copy ``src``'s bytes to ``dest`` (mode as for a new file, not ``src``'s)."""
    with atomic_path(dest, **kwargs) as tmp:
        shutil.copyfile(src, tmp)


# ------------------------------------------------------------------------------- content digests


def stat_key(path: str | os.PathLike) -> dict:
    """What changes when a file is rewritten (size, mtime) or replaced by a rename (inode)."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _read_checksums(folder: Path) -> dict:
    try:
        data = json.loads((folder / CHECKSUM_CACHE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def remembered_sha256(path: str | os.PathLike) -> str | None:
    """The digest ``file_sha256(path, remember=True)`` kept, if the file has not changed since; else None."""
    path = Path(path)
    entry = _read_checksums(path.parent).get(path.name)
    if isinstance(entry, dict) and {k: entry.get(k) for k in ("size", "mtime_ns", "inode")} == stat_key(path):
        return entry.get("sha256")
    return None


def remember_sha256(path: str | os.PathLike, digest: str) -> None:
    """Keep ``digest`` as ``path``'s for ``file_sha256(remember=True)`` (a digest computed while the file
    was written). Best effort: a read-only folder only costs a re-hash next time."""
    path = Path(path)
    cache = _read_checksums(path.parent)
    cache[path.name] = {**stat_key(path), "sha256": digest}
    try:
        write_json_atomic(path.parent / CHECKSUM_CACHE, cache, sort_keys=True, fsync=False)
    except OSError as exc:
        logger.debug("cannot cache the checksum of %s: %s", path, exc)


def file_sha256(path: str | os.PathLike, remember: bool = False) -> str:
    """sha256 of a file's bytes (hex). ``remember`` keeps it beside the file, trusted while its
    ``stat_key`` holds: for large files read at every start (checkpoints)."""
    path = Path(path)
    if remember:
        digest = remembered_sha256(path)
        if digest:
            return digest
        if path.stat().st_size > LOG_HASHING_ABOVE:
            logger.info("computing the sha256 of %s (once; the digest is cached)", path)
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if remember:
        remember_sha256(path, digest)
    return digest


def content_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of every file under a folder (a DICOM series) with its relative name."""
    if not os.path.isdir(path):
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


def file_stamp(path: str | os.PathLike, prefix: str) -> dict:
    """What the bank records of a source file: size and mtime (a cheap "unchanged") and sha256."""
    st = os.stat(path)
    return {f"{prefix}_size": st.st_size, f"{prefix}_mtime_ns": st.st_mtime_ns, f"{prefix}_sha256": content_sha256(path)}


def same_content(source: Mapping, prefix: str, path: str | os.PathLike) -> bool:
    """True if ``path`` still holds what ``source`` (a ``file_stamp``) recorded. Same size and mtime is
    taken as unchanged; otherwise the content is hashed (a file touched but not changed is not stale)."""
    recorded = source.get(f"{prefix}_sha256")
    if not recorded:
        return False
    if not os.path.isdir(path):
        st = os.stat(path)
        if st.st_size == source.get(f"{prefix}_size") and st.st_mtime_ns == source.get(f"{prefix}_mtime_ns"):
            return True
    return content_sha256(path) == recorded


class DigestMemo:
    """``file_sha256`` remembered in this process by ``stat_key``, for files in folders it should not
    write a checksum cache into (a datastore's images)."""

    def __init__(self):
        self._known: dict[str, tuple[dict, str]] = {}
        self._lock = threading.Lock()

    def sha256(self, path: str | os.PathLike) -> str:
        key, stamp = str(path), stat_key(path)
        with self._lock:
            hit = self._known.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        digest = file_sha256(path)
        with self._lock:
            self._known[key] = (stamp, digest)
        return digest
