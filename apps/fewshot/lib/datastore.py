"""MONAI Label's local datastore, made safe for a growing support bank.

Stock MONAI Label 0.8.5 copies whatever a client uploads into the datastore: a label of the wrong
shape, a few bytes of garbage (over the previous final label), a traversing id (500, or a file
written outside the datastore). Here every write is validated first (``lib.validation``) and
refused with a 4xx before anything on disk changes. Writes that pass are atomic (temporary file,
then rename), including MONAI Label's own ``datastore_v2.json``, so a crash never leaves a torn
label or index behind.

Changes to final labels are reported to a listener (the app's ingestion worker), which keeps the
support bank in step; files changed behind the server's back are picked up through ``refresh``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from typing import Any, Dict, Protocol

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from lib.validation import VOLUME_SUFFIXES, UploadValidator, check_id, check_tag, volume_suffix

logger = logging.getLogger(__name__)

FINAL = DefaultLabelTag.FINAL.value


class FinalLabelListener(Protocol):
    def final_label_saved(self, image_id: str, reason: str) -> None: ...

    def final_label_removed(self, image_id: str) -> None: ...

    def datastore_changed(self) -> None: ...


def _atomic_copy(src: str, dest: str) -> None:
    tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.{uuid.uuid4().hex}.tmp")
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class FewshotDatastore(LocalDatastore):
    def __init__(self, datastore_path: str, validator: UploadValidator, listener: FinalLabelListener, **kwargs):
        self.validator = validator
        self.listener = listener
        super().__init__(datastore_path, **kwargs)

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
        image_path = self._image_path(image_id)
        started = time.perf_counter()
        self.validator.check_label(image_id, image_path, label_filename)
        ext = volume_suffix(label_filename)
        label_dir = self._datastore.label_path(label_tag)
        name = self._filename(image_id, ext)
        dest = os.path.join(label_dir, name)
        with FileLock(self._lock_file):
            os.makedirs(label_dir, exist_ok=True)
            _atomic_copy(label_filename, dest)
            # A label saved before under another extension would shadow or duplicate this one.
            for other in VOLUME_SUFFIXES:
                stale = os.path.join(label_dir, self._filename(image_id, other))
                if other != ext and os.path.exists(stale):
                    os.unlink(stale)
            info = dict(label_info or {})
            info.update(ts=int(time.time()), name=name)
            self._datastore.objects[image_id].labels[label_tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)
        logger.info("saved %s label of %r (checked in %.3f s)", label_tag, image_id, time.perf_counter() - started)
        if label_tag == FINAL:
            self.listener.final_label_saved(image_id, "final label saved")
        return image_id

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_tag(label_tag)
        self._image_path(label_id)
        path = self.get_label_uri(label_id, label_tag)
        if not path or not os.path.isfile(path):
            raise HTTPException(404, f"image {label_id!r} has no {label_tag!r} label")
        super().remove_label(label_id, label_tag)
        if self._auto_reload:
            self.refresh()  # stock code leaves the index to the file watcher: clients would see the label a moment longer
        if label_tag == FINAL:
            self.listener.final_label_removed(label_id)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        check_tag(label_tag)
        self._image_path(label_id)
        if not self.get_label_uri(label_id, label_tag):
            raise HTTPException(404, f"image {label_id!r} has no {label_tag!r} label")
        super().update_label_info(label_id, label_tag, info)

    # ------------------------------------------------------------------ images

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        if image_id:
            check_id(image_id)
        else:
            image_id, _ = self._to_id(os.path.basename(image_filename))
        final_label = self.get_label_uri(image_id, FINAL)
        final_label = final_label if final_label and os.path.isfile(final_label) else None
        self.validator.check_image(image_filename, final_label)
        image_id = super().add_image(image_id, image_filename, image_info)
        if final_label:
            # MONAI Label keeps the labels of a replaced image; its bank entries must follow the new voxels.
            self.listener.final_label_saved(image_id, "image replaced")
        return image_id

    def remove_image(self, image_id: str) -> None:
        self._image_path(image_id)
        self.refresh()  # the index must not list a label whose file is already gone: remove_label would 404
        super().remove_image(image_id)  # removes its labels through remove_label, which tells the bank

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        self._image_path(image_id)
        super().update_image_info(image_id, info)

    # ------------------------------------------------------------------ disk

    def refresh(self):
        super().refresh()
        listener = getattr(self, "listener", None)  # refresh already runs inside LocalDatastore.__init__
        if listener is not None:
            listener.datastore_changed()

    def _update_datastore_file(self, lock=True):
        """MONAI Label's index, written atomically (the stock version truncates then writes)."""

        def write():
            # Renamed into place: the file watcher sees a move, not a modification, so there is
            # no self-inflicted reload to ignore (stock code sets _ignore_event_config here).
            path = self._datastore_config_path
            tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "w") as f:
                f.write(json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self._config_ts = os.stat(path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()
