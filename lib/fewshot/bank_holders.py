"""Which processes have a bank directory open, so that none replaces a bank another one uses.

A bank built with other settings (another fingerprint) is discarded when opened for writing: right
for a stale bank, wrong for one a running server holds. A CLI run with ``--set`` changes once
rebuilt the shared bank under a server, which then answered "nothing segmented" (issue 13).

Every process that uses a bank directory holds a shared ``flock`` on ``<bank>/.holders`` for as
long as it uses it (the server for its whole life, a CLI command while it runs). A process may
replace the bank only when no other process holds it: it asks by trying to take that lock
exclusively (``used_elsewhere``). Locks are per process here: threads and several ``SupportBank``
objects of one process share one open file, so they never count as "another process".
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import logging
import threading
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

HOLDERS = ".holders"
_held: dict[str, list] = {}  # real path of the bank directory -> [fd, users in this process]
_lock = threading.Lock()


def _key(directory: str | os.PathLike) -> str:
    return os.path.realpath(directory)


def hold(directory: str | os.PathLike) -> None:
    """Hold the bank directory (created if absent) until ``release`` or the process ends."""
    key = _key(directory)
    with _lock:
        if key in _held:
            _held[key][1] += 1
            return
        try:
            _held[key] = [_open_shared(key), 1]
        except OSError as exc:  # a read-only or full disk: nobody can replace the bank there either
            logger.warning("cannot hold support bank %s (%s): another process could replace it", key, exc)


def ensure_held(directory: str | os.PathLike) -> None:
    """After the directory was removed and made again: hold the new one (the old lock is on a
    deleted file, which other processes no longer see)."""
    key = _key(directory)
    with _lock:
        entry = _held.get(key)
        if entry is None:
            return
        try:
            same = os.stat(os.path.join(key, HOLDERS)).st_ino == os.fstat(entry[0]).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(entry[0])
            entry[0] = _open_shared(key)


def _open_shared(key: str) -> int:
    Path(key).mkdir(parents=True, exist_ok=True)
    fd = os.open(os.path.join(key, HOLDERS), os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while another process replaces the bank
    return fd


def release(directory: str | os.PathLike) -> None:
    key = _key(directory)
    with _lock:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _held[key]
            os.close(entry[0])  # closing the file drops its lock


@contextlib.contextmanager
def holding(directory: str | os.PathLike) -> Iterator[None]:
    hold(directory)
    try:
        yield
    finally:
        release(directory)


def used_elsewhere(directory: str | os.PathLike) -> bool:
    """True if another process holds the bank directory (this process's own hold does not count)."""
    key = _key(directory)
    path = os.path.join(key, HOLDERS)
    if not os.path.exists(path):
        return False
    with _lock:
        entry = _held.get(key)
        try:
            fd = entry[0] if entry else os.open(path, os.O_RDWR)
        except OSError:  # a read-only disk: nobody can replace the bank there anyway
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False
        finally:
            # Back to what this process had: its shared hold, or nothing. (Converting a flock is not
            # atomic, so a failed attempt may have dropped the shared lock too: take it again.)
            if entry:
                fcntl.flock(fd, fcntl.LOCK_SH)
            else:
                os.close(fd)


def recorded_fingerprint(directory: str | os.PathLike) -> str | None:
    """The fingerprint a bank directory's manifest records; None when it holds no bank, "" when its
    manifest cannot be read (a damaged bank: nobody can use it as it is)."""
    path = Path(directory) / "manifest.json"
    try:
        return str(json.loads(path.read_bytes())["fingerprint"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def sibling(directory: str | os.PathLike, fingerprint: str) -> Path:
    """A bank directory of its own for ``fingerprint``, beside the shared one (``bank-classic`` ->
    ``bank-classic-3f2a9c01de``): the same settings always find the same one again."""
    directory = Path(directory)
    return directory.with_name(f"{directory.name}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:10]}")
