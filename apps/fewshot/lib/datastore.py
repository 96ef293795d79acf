"""MONAI Label's local datastore, made safe for a growing support bank.

Stock MONAI Label 0.8.5 copies whatever a client uploads into the datastore: a label of the wrong
shape, a few bytes of garbage (over the previous final label), a traversing id (500, or a file
written outside the datastore), info that is not a JSON object (written, then a 500). Here every
write is validated first (``lib.validation``) and refused with a 4xx before anything on disk
changes. Writes that pass are atomic (temporary file, then rename), including MONAI Label's own
``datastore_v2.json``, so a crash never leaves a torn label or index behind; temporary files a
crash left are removed at start-up.

Changes to final labels are reported to a listener (the app's ingestion worker), which keeps the
support bank in step; files changed behind the server's back are picked up through ``refresh``
(created or deleted files) and ``_on_modify_event`` (files rewritten in place).
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Protocol

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.datastore import DefaultLabelTag

from fewshot.files import STALE_TMP, copy_atomic, tmp_beside, write_json_atomic
from lib import annotations, ohif_label
from lib.labels import client_segments
from lib.validation import RESERVED_INFO_KEYS, VOLUME_SUFFIXES, UploadValidator, check_id, check_info, check_tag, volume_suffix
from lib.watcher import WatcherSupervisor

logger = logging.getLogger(__name__)

FINAL = DefaultLabelTag.FINAL.value


class FinalLabelListener(Protocol):
    def final_label_saved(self, image_id: str, reason: str) -> None: ...

    def final_label_removed(self, image_id: str) -> None: ...

    def datastore_changed(self, delay: float = 0.0) -> None: ...


# A file rewritten in place sends a burst of events; the bank is checked once it has been quiet this long.
REWRITE_SETTLE_SECONDS = 1.0
def _keep_aside(path: str, aside: str) -> None:
    """A second name for ``path`` while it is replaced: a hard link (no copy, and the rename that
    replaces ``path`` stays atomic), or a copy where the file system has no hard links."""
    try:
        os.link(path, aside)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
        shutil.copy2(path, aside)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.error("could not remove %s: %s", path, exc)


def file_signature(path: str | None) -> tuple | None:
    """What changes when a file is replaced (a rename gives a new inode) or rewritten; None if absent."""
    try:
        st = os.stat(path) if path else None
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns) if st else None


STORAGE_REASONS = {
    errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
}


def storage_error(exc: OSError, what: str, root: str | None = None) -> HTTPException:
    """A write the datastore's disk refused, for the client: 507 with the reason and which part of
    the datastore (``root``) could not be written, never a server path. Logged with the path."""
    reason = STORAGE_REASONS.get(exc.errno) or (os.strerror(exc.errno) if exc.errno else type(exc).__name__)
    where = _datastore_part(exc, root)
    logger.error("%s: %s%s (%s)", what, f"cannot write {where}: " if where else "", reason, exc)
    return HTTPException(507, f"{what}: {f'cannot write {where}: ' if where else ''}{reason}; nothing was changed, "
                              "try again once the server's disk is writable")


def _datastore_part(exc: OSError, root: str | None) -> str | None:
    """The datastore folder or file a failed write was aimed at, as a client may be told it."""
    name = exc.filename or exc.filename2
    if not name or not root:
        return None
    rel = os.path.relpath(os.path.abspath(os.fsdecode(name)), os.path.abspath(root))
    if rel == ".." or rel.startswith(".." + os.sep):
        return None
    folder, base = os.path.split(rel)
    if "datastore_v2.json" in base:
        return "the datastore's index (datastore_v2.json)"
    if base == ".lock" and not folder:
        return "the datastore's lock file (.lock)"
    return f"{folder}/" if folder else "the datastore folder"


def changed_meanwhile(what: str) -> HTTPException:
    return HTTPException(409, f"{what} changed while this request was being checked; nothing was stored, send it again")


def without_provenance(info: dict) -> dict:
    """Label info as the index keeps it. An automatic result saved by /infer or /batch/infer carries
    per-slice provenance (tens of kB per image) that went to the client; the index keeps the rest."""
    if isinstance(info.get("params"), dict) and "provenance" in info["params"]:
        info = dict(info, params={k: v for k, v in info["params"].items() if k != "provenance"})
    return info


class AtomicIndexMixin:
    """For LocalDatastore subclasses: MONAI Label's index written atomically (the stock version
    truncates then writes, so a crash leaves a torn index), guarded against concurrent threads, and
    the temporary files a killed write left removed at start-up."""

    @property
    def _guard(self) -> threading.RLock:
        """One thread at a time reads or changes the in-memory index. Stock MONAI Label rebuilds it
        in the file watcher's thread (``_remove_non_existing`` iterates ``objects`` and refills it)
        while request threads change it: unguarded, a delete raced the watcher and both raised
        "dictionary changed size during iteration" (a 500, and a dead watcher). Always taken
        before the cross-process ``FileLock``, never after it."""
        guard = self.__dict__.get("_index_guard")  # refresh runs inside LocalDatastore.__init__ already
        return guard if guard is not None else self.__dict__.setdefault("_index_guard", threading.RLock())

    @contextmanager
    def _index_transaction(self, what: str = "the datastore's index could not be updated") -> Iterator[None]:
        """The index as on disk, held against this process's other threads and other processes. A
        disk that refuses even the lock file (read-only, full) is a 507 saying ``what`` failed."""
        with self._guard:
            try:
                lock = FileLock(self._lock_file)
                lock.acquire()
            except OSError as exc:
                raise storage_error(exc, what, self._datastore_path) from exc
            try:
                self._reload_index()
                yield
            finally:
                lock.release()

    def _remove_stale_tmp(self) -> None:
        folders = {self._datastore_path, self._datastore.image_path(), *self._label_dirs()}
        for folder in folders:
            for name in os.listdir(folder) if os.path.isdir(folder) else ():
                if STALE_TMP.match(name) and os.path.isfile(os.path.join(folder, name)):
                    os.unlink(os.path.join(folder, name))
                    logger.info("removed %s, left by an interrupted write", os.path.join(folder, name))

    def _label_dirs(self) -> list[str]:
        root = self._datastore.label_path(None)
        return [os.path.join(root, d) for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))] if os.path.isdir(root) else []

    def _update_datastore_file(self, lock=True):
        def write():
            # Renamed into place: a file watcher sees a move, not a modification, so there is
            # no self-inflicted reload to ignore (stock code sets _ignore_event_config here).
            path = self._datastore_config_path
            # A full disk leaves the old index and no partial copy behind.
            write_json_atomic(path, self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            self._config_ts = os.stat(path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    def _reload_index(self) -> None:
        """What another process (a background task) recorded since this one last read or wrote the
        index. Call with the index lock held, so nothing lands between reading and writing it back
        (stock ``_init_from_datastore_file`` takes the lock itself)."""
        path = self._datastore_config_path
        if os.path.exists(path) and os.stat(path).st_mtime != self._config_ts:
            ts = os.stat(path).st_mtime
            model = self._read_index_file(path)
            if model is None:  # damaged and set aside: the index in memory is written back by the caller
                return
            model.base_path = self._datastore_path
            self._datastore, self._config_ts = model, ts

    def _init_from_datastore_file(self, throw_exception=False):
        """Stock version, guarded, and tolerant of a damaged index: at start-up a garbage
        ``datastore_v2.json`` stopped the server. It is set aside and the index rebuilt from the
        files on disk (``_reconcile_datastore``, which runs next at start-up)."""
        with self._guard, FileLock(self._lock_file):
            self._reload_index()

    @property
    def _may_repair_index(self) -> bool:
        """Only the live server renames a damaged index (not a MONAI Label background task's copy)."""
        return bool(self.__dict__.get("_repair_index", self.__dict__.get("live", False)))

    def _read_index_file(self, path: str) -> LocalDatastoreModel | None:
        """The index on disk, or None when it cannot be read as one (then kept aside as
        ``datastore_v2.json.damaged-<time>`` and said in the log): the in-memory index, rebuilt
        from the files on disk, replaces it at the next write."""
        try:
            with open(path) as fp:
                return LocalDatastoreModel.model_validate_json(fp.read())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError) as exc:
            problem = " ".join(str(exc).split())[:300]
        aside = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        if not self._may_repair_index:
            logger.error("datastore index %s is damaged (%s); left as it is in this process", path, problem)
            self._config_ts = os.stat(path).st_mtime  # do not read it again until it changes
            return None
        try:
            os.replace(path, aside)
        except OSError as exc:
            logger.error("datastore index %s is damaged (%s) and cannot be set aside (%s); it is rebuilt in memory", path, problem, exc)
            self._config_ts = os.stat(path).st_mtime
            return None
        logger.warning(
            "datastore index %s is damaged (%s): kept aside as %s; the index is rebuilt from the image and label "
            "files on disk (the info it held, such as client ids and strategy times, is not)", path, problem, aside,
        )
        self._config_ts = 0
        self._index_rebuilt = aside
        return None

    def _remove_other_extensions(self, folder: str, image_id: str, keep: str) -> None:
        """A file saved before under another extension would shadow or duplicate the new one."""
        for other in VOLUME_SUFFIXES:
            stale = os.path.join(folder, self._filename(image_id, other))
            if other != keep and os.path.exists(stale):
                os.unlink(stale)

    def _indexed(self, image_id: str) -> ImageLabelModel:
        """The image's index entry (callers have checked the image exists)."""
        return self._datastore.objects[image_id]

    def _write_label(self, image_id: str, tag: str, src: str, ext: str, info: dict, image_signature: tuple | None = None) -> str:
        """``src`` as the image's ``tag`` label, atomically, replacing it in any format, and recorded
        in the index; all under the index lock. ``image_signature``: the image's file as the label
        was checked against it; if it was replaced since, 409 and nothing changes. If the index
        cannot be written, the previous label is put back (507): a label file the index does not
        describe would leave the bank following a save the client was told had failed.
        Returns the stored file's name."""
        label_dir = self._datastore.label_path(tag)
        name = self._filename(image_id, ext)
        dest = os.path.join(label_dir, name)
        with self._index_transaction(f"the {tag!r} label of {image_id!r} could not be stored"):
            if image_signature is not None and file_signature(self.get_image_uri(image_id)) != image_signature:
                raise changed_meanwhile(f"image {image_id!r}")
            obj = self._indexed(image_id)
            before = obj.labels.get(tag)
            # The label files this save replaces (any format), kept aside until the index is written.
            old = [os.path.join(label_dir, self._filename(image_id, e)) for e in VOLUME_SUFFIXES]
            kept: list[tuple[str, str]] = []
            wrote = False  # dest holds this upload: only then may an undo remove it
            try:
                os.makedirs(label_dir, exist_ok=True)
                for path in old:
                    if os.path.exists(path):
                        aside = str(tmp_beside(path))
                        _keep_aside(path, aside)
                        kept.append((aside, path))
                copy_atomic(src, dest)
                wrote = True
                self._remove_other_extensions(label_dir, image_id, ext)
                obj.labels[tag] = DataModel(info=dict(info, ts=int(time.time()), name=name), ext=ext)
                self._update_datastore_file(lock=False)
            except OSError as exc:
                self._restore(obj, tag, before, dest if wrote else None, kept)
                raise storage_error(exc, f"the {tag!r} label of {image_id!r} could not be stored", self._datastore_path) from exc
            for aside, _ in kept:
                _remove_quietly(aside)
        return name

    def _restore(self, obj: ImageLabelModel, tag: str, before: DataModel | None, written: str | None,
                 kept: list[tuple[str, str]]) -> None:
        """Undo a label write that failed part-way: the previous files and index entry. ``written``:
        the file this save wrote, if it got that far (a file it did not write is never removed: a
        link refused before the copy once made the undo delete the label it was to keep). Logged,
        never raised: the caller answers with the first error."""
        if before is None:
            obj.labels.pop(tag, None)
        else:
            obj.labels[tag] = before
        if written is not None and not any(path == written for _, path in kept) and os.path.exists(written):
            _remove_quietly(written)
        for aside, path in kept:
            try:
                os.replace(aside, path)
            except OSError as exc:
                logger.error("could not put %s back from %s: %s", path, aside, exc)

    def _record_image(self, image_id: str, ext: str, info: dict) -> bool:
        """The image's index entry, its labels kept (stock add_image starts a replaced image with no
        labels, though their files stay on disk). Call inside ``_index_transaction``; True if replaced."""
        old = self._datastore.objects.get(image_id)
        info = dict(info, ts=int(time.time()), name=self._filename(image_id, ext))
        self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext), labels=dict(old.labels) if old else {})
        self._update_datastore_file(lock=False)
        return old is not None


# Stock methods that read or rebuild the in-memory index, run under the guard (see ``_guard``).
GUARDED = (
    "_reconcile_datastore", "datalist", "get_labeled_images", "get_unlabeled_images",
    "list_images", "json", "status", "update_image_info", "update_label_info", "get_dataset_archive",
)


def _guarded(name: str):
    def method(self, *args, **kwargs):
        with self._guard:
            return getattr(super(AtomicIndexMixin, self), name)(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    return method


for _name in GUARDED:
    setattr(AtomicIndexMixin, _name, _guarded(_name))


class FewshotDatastore(AtomicIndexMixin, LocalDatastore):
    def __init__(
        self, datastore_path: str, validator: UploadValidator, listener: FinalLabelListener, clean_tmp: bool = False, **kwargs
    ):
        """``clean_tmp``: remove temporary files a killed write left (only the server itself: a
        background task's process must not delete the live server's files in flight)."""
        self.validator = validator
        self.listener = listener
        self.watcher: WatcherSupervisor | None = None
        self._repair_index = clean_tmp
        super().__init__(datastore_path, **kwargs)
        if getattr(self, "_index_rebuilt", None) and not os.path.exists(self._datastore_config_path):
            self._update_datastore_file()  # the rebuilt index on disk at once, not at the first save
        if getattr(self, "_observer", None) is not None:
            # Renames are how the index is now written (a background task's process records e.g.
            # original labels that way) and how most tools replace a file: stock code ignores them.
            self._handler.on_moved = self._on_moved_event
            self.watcher = WatcherSupervisor(self, self.refresh).start()
        if clean_tmp:
            self._remove_stale_tmp()

    def watcher_status(self) -> dict:
        if self.watcher is None:
            return {"state": "off", "why": "auto_reload is off: files changed on disk are noticed at start-up only"}
        return self.watcher.status()

    # ------------------------------------------------------------------ checks

    def _image_path(self, image_id: str) -> str:
        check_id(image_id)
        path = self.get_image_uri(image_id)
        if not path or not os.path.isfile(path):
            raise HTTPException(404, f"unknown image id {image_id!r}: the datastore has no such image")
        return path

    # ------------------------------------------------------------------ labels

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        check_tag(label_tag)
        info = without_provenance(dict(check_info({} if label_info is None else label_info, "params", RESERVED_INFO_KEYS)))
        grid = ohif_label.pop_grid(info, image_id)
        image_path = self._image_path(image_id)
        started = time.perf_counter()
        # The image as the label is checked against it: replaced meanwhile (a concurrent
        # PUT /datastore/image), the label is refused rather than stored beside an image it may not fit.
        image_signature = file_signature(image_path)
        work = upload = None
        stored = label_filename
        try:
            upload = label_filename
            if ohif_label.is_raw(label_filename):
                # OHIF's Save: the viewer's labelmap, turned onto this image's grid (lib/ohif_label.py).
                work = tempfile.mkdtemp(prefix="ohif-label-")
                upload = ohif_label.raw_to_nifti(image_id, image_path, label_filename, os.path.join(work, "label.nii.gz"),
                                                 grid, grid_required=True)
            stored = self.validator.check_label(image_id, image_path, upload, client_segments(info))
            annotation = annotations.parse(info, self.validator.label_map(), stored)
            if annotation is not None:
                info[annotations.INFO_KEY] = annotation.as_dict()
            self._write_label(image_id, label_tag, stored, volume_suffix(upload), info, image_signature)
        finally:
            if stored not in (label_filename, upload) and os.path.exists(stored):
                os.unlink(stored)
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
        logger.info(
            "saved %s label of %r (checked in %.3f s%s)", label_tag, image_id, time.perf_counter() - started,
            "; segment values translated from the client's label_info" if stored not in (label_filename, upload) else "",
        )
        if label_tag == FINAL:
            self.listener.final_label_saved(image_id, "final label saved")
        return image_id

    def remove_label(self, label_id: str, label_tag: str) -> None:
        """The file and its index entry go together (stock code deletes the file and leaves the index
        to the watcher). If the index cannot be written, the file is put back: 507, nothing changed."""
        check_tag(label_tag)
        self._image_path(label_id)
        logger.info("removing %s label of %r", label_tag, label_id)
        with self._index_transaction(f"the {label_tag!r} label of {label_id!r} could not be removed"):
            path = self.get_label_uri(label_id, label_tag)
            if not path or not os.path.isfile(path):
                raise HTTPException(404, f"image {label_id!r} has no {label_tag!r} label")
            obj = self._indexed(label_id)
            before = obj.labels.get(label_tag)
            aside = str(tmp_beside(path))
            try:
                os.replace(path, aside)  # a rename needs no free space
                obj.labels.pop(label_tag, None)
                self._update_datastore_file(lock=False)
            except OSError as exc:
                if before is not None:
                    obj.labels[label_tag] = before
                if os.path.exists(aside):
                    os.replace(aside, path)
                raise storage_error(exc, f"the {label_tag!r} label of {label_id!r} could not be removed", self._datastore_path) from exc
            os.unlink(aside)
        if label_tag == FINAL:
            self.listener.final_label_removed(label_id)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        check_info(info, "info", RESERVED_INFO_KEYS)
        check_tag(label_tag)
        self._image_path(label_id)
        if not self.get_label_uri(label_id, label_tag):
            raise HTTPException(404, f"image {label_id!r} has no {label_tag!r} label")
        super().update_label_info(label_id, label_tag, info)

    # ------------------------------------------------------------------ images

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        info = dict(check_info({} if image_info is None else image_info, "params", RESERVED_INFO_KEYS))
        if not image_id:
            raise HTTPException(400, "no image id: pass ?image=ID or upload a file named ID.nii.gz")
        check_id(image_id)
        final_label = self.get_label_uri(image_id, FINAL)
        final_label = final_label if final_label and os.path.isfile(final_label) else None
        # The final label as the image is checked against it: a label saved meanwhile (for the old
        # image) makes this replacement a 409 rather than leave a label that may not fit.
        label_signature = file_signature(final_label)
        self.validator.check_image(image_filename, final_label)
        ext = volume_suffix(image_filename)
        with self._index_transaction(f"image {image_id!r} could not be stored"):
            if file_signature(self._final_label_file(image_id)) != label_signature:
                raise changed_meanwhile(f"the final label of {image_id!r}")
            try:
                copy_atomic(image_filename, os.path.join(self._datastore.image_path(), self._filename(image_id, ext)))
                self._remove_other_extensions(self._datastore.image_path(), image_id, ext)
                replaced = self._record_image(image_id, ext, info)
            except OSError as exc:
                raise storage_error(exc, f"image {image_id!r} could not be stored", self._datastore_path) from exc
        logger.info("%s image %r", "replaced" if replaced else "added", image_id)
        if final_label:
            # Its bank entries must follow the new voxels.
            self.listener.final_label_saved(image_id, "image replaced")
        return image_id

    def remove_image(self, image_id: str) -> None:
        self._image_path(image_id)
        with self._guard:  # no save lands between its labels' removal and its own
            self.refresh()  # the index must not list a label whose file is already gone: remove_label would 404
            super().remove_image(image_id)  # removes its labels through remove_label, which tells the bank
            if self._auto_reload:
                self.refresh()  # stock code leaves the image's index entry to the watcher

    def _final_label_file(self, image_id: str) -> str | None:
        path = self.get_label_uri(image_id, FINAL)
        return path if path and os.path.isfile(path) else None

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        check_info(info, "info", RESERVED_INFO_KEYS)
        self._image_path(image_id)
        super().update_image_info(image_id, info)

    # ------------------------------------------------------------------ disk

    def refresh(self):
        super().refresh()
        listener = getattr(self, "listener", None)  # refresh already runs inside LocalDatastore.__init__
        if listener is not None:
            listener.datastore_changed()

    def _on_moved_event(self, event):
        dest = getattr(event, "dest_path", None)
        if dest == self._datastore_config_path:
            self._init_from_datastore_file()  # no-op when the file is the one this process wrote
            return
        if event.is_directory:
            return
        # An image or label renamed into place, over another or out of the datastore: the index
        # follows, and the bank checks (by size, time, then hash) whether a final label changed.
        self.refresh()
        self.listener.datastore_changed(delay=REWRITE_SETTLE_SECONDS)

    def _on_modify_event(self, event):
        super()._on_modify_event(event)
        # Stock code ignores files rewritten in place; a final label changed that way would keep
        # its old bank entries until the next start-up.
        if event.src_path != self._datastore_config_path and not event.is_directory:
            self.listener.datastore_changed(delay=REWRITE_SETTLE_SECONDS)
