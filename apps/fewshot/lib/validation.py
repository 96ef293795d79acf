"""Checks on what clients send, made before anything reaches the datastore or the bank.

Every rejection is an ``HTTPException`` with a 4xx status and a message a user can act on:

* 400: an id or tag that is not a plain name (path traversal, separators, hidden names), params or
  info that are not a JSON object;
* 404: an image id the datastore does not have;
* 415: an upload whose file type is not a volume format the datastore stores;
* 422: an upload of the right type that cannot be used: unreadable or not 3D, a label whose shape
  or affine differs from its image, non-integer values, values outside the configured labels.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import nibabel as nib
import numpy as np
from fastapi import HTTPException

from fewshot.volume import check_label_geometry, label_nifti, Volume, VolumeError, read_label, read_volume, validate_label_values
from lib.labels import Segments, value_table

logger = logging.getLogger(__name__)

MAX_ID_LENGTH = 255
TAG_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# What the local datastore stores as 3D volumes (MONAI Label's extensions minus 2D/pathology ones).
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd")


def check_id(value, what: str = "image id") -> str:
    """A datastore id is a file name without its extension: never a path."""
    if not isinstance(value, str) or not value.strip():
        raise HTTPException(400, f"missing {what}")
    problems = []
    if any(sep in value for sep in ("/", "\\", "\0")):
        problems.append("contains a path separator")
    if value.startswith(".") or value in (".", ".."):
        problems.append("starts with '.'")
    if len(value) > MAX_ID_LENGTH:
        problems.append(f"is longer than {MAX_ID_LENGTH} characters")
    if any(ord(c) < 32 for c in value):
        problems.append("contains control characters")
    if what == "image id" and any(s in value.lower() for s in (".nii", ".nrrd")):
        # MONAI Label's _to_id removes the file's extension wherever it occurs in the name, so such
        # an id would be stored under one name and listed under another.
        problems.append("contains a file extension (.nii, .nrrd)")
    if problems:
        raise HTTPException(400, f"invalid {what} {value!r}: it {' and '.join(problems)}; ids are plain file names")
    return value


# Keys the datastore itself writes or derives (file name, timestamp, path, the id a strategy returns):
# a client's info must not shadow them.
RESERVED_INFO_KEYS = ("id", "path", "name", "ts")


def parse_json_object(text: Any, what: str) -> dict:
    """A client's ``params``/``info`` form field -> dict, or a 400 that says what is wrong."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        value = text
    else:
        try:
            value = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise HTTPException(400, f"{what} is not valid JSON ({exc}); send a JSON object, e.g. {{}}") from None
    check_info(value, what)
    return value


def check_info(value: Any, what: str, reserved: Sequence[str] = ()) -> dict:
    """Info stored in the datastore index: a JSON object of JSON values (finite numbers)."""
    if not isinstance(value, dict):
        raise HTTPException(400, f"{what} must be a JSON object ({{...}}), not {type(value).__name__} {_short(value)}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise HTTPException(400, f"{what} holds a value that is not plain JSON ({exc})") from None
    clash = sorted(k for k in value if k in reserved)
    if clash:
        raise HTTPException(400, f"{what} may not set {clash}: the datastore maintains these keys itself")
    return value


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not TAG_PATTERN.match(tag) or ".." in tag:
        raise HTTPException(400, f"invalid label tag {tag!r}: use letters, digits, '_', '-' (e.g. final)")
    return tag


def volume_suffix(path: str) -> str | None:
    lower = path.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    return None


def _clean(message: str, upload_path: str, what: str) -> str:
    """Error messages name the user's upload, not the server's temporary file; first line only
    (readers append installation advice that does not apply to a corrupt file)."""
    first = message.strip().splitlines()[0] if message.strip() else "unreadable"
    return first.replace(f"{upload_path}: ", f"{what}: ").replace(upload_path, what)


def _spatial(shape: tuple) -> tuple:
    """Trailing singleton axes dropped, as the engine's reader does."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


class UploadValidator:
    """Validates uploads against the datastore's images. Images read for the check are kept in a
    small cache (keyed by path, size and mtime) so saving several labels for one image is fast.

    A NIfTI label for a NIfTI image is checked from the headers and the raw voxels (nibabel, the
    reader MONAI uses for NIfTI): ~10x faster than a full read, so a save answers at once. Other
    formats go through the engine's reader."""

    def __init__(
        self,
        allowed_values: Callable[[], Sequence[int] | None],
        label_map: Callable[[], dict[str, int]] = dict,
        cache_size: int = 2,
    ):
        self.allowed_values = allowed_values
        self.label_map = label_map
        self.cache_size = cache_size
        self._images: OrderedDict[tuple, Volume] = OrderedDict()
        self._geometries: OrderedDict[tuple, tuple] = OrderedDict()
        self._lock = threading.Lock()

    def _nifti_geometry(self, image_path: str) -> tuple[tuple, np.ndarray]:
        st = os.stat(image_path)
        key = (image_path, st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._geometries:
                return self._geometries[key]
        img = nib.load(image_path)
        geometry = _spatial(img.shape), np.asarray(img.affine, dtype=np.float64)
        with self._lock:
            self._geometries[key] = geometry
            while len(self._geometries) > 64:
                self._geometries.popitem(last=False)
        return geometry

    def _read_nifti_label(self, image_id: str, image_path: str, upload_path: str, allowed, what: str) -> np.ndarray:
        try:
            shape, affine = self._nifti_geometry(image_path)
        except Exception as exc:
            raise HTTPException(409, f"image {image_id!r} in the datastore is unreadable, so no label can be checked against it: {exc}") from None
        try:
            img = nib.load(upload_path)
            label_shape = _spatial(img.shape)
            if len(label_shape) != 3:
                raise VolumeError(f"{what}: expected a 3D image, got {len(label_shape)}D with shape {label_shape}")
            check_label_geometry(what, label_shape, img.affine, shape, affine)
            return validate_label_values(np.asanyarray(img.dataobj).reshape(label_shape), what, allowed)
        except VolumeError as exc:
            raise HTTPException(422, str(exc)) from None
        except Exception as exc:  # truncated or corrupt voxel data
            raise HTTPException(422, f"{what} is not a valid NIfTI file ({type(exc).__name__}: {_clean(str(exc), upload_path, '')})") from None

    def _image(self, image_path: str) -> Volume:
        st = os.stat(image_path)
        key = (image_path, st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key]
        volume = read_volume(image_path)
        with self._lock:
            self._images[key] = volume
            while len(self._images) > self.cache_size:
                self._images.popitem(last=False)
        return volume

    @staticmethod
    def check_type(upload_path: str, what: str) -> None:
        suffix = volume_suffix(upload_path)
        if suffix is None:
            found = "".join(Path(Path(upload_path).name).suffixes) or "no extension"
            raise HTTPException(415, f"{what} has file type {found!r}; upload a 3D volume as {', '.join(VOLUME_SUFFIXES)}")
        if suffix in (".nii", ".nii.gz"):
            # The header alone tells a corrupt or truncated upload apart, with nibabel's precise reason.
            try:
                nib.load(upload_path).header
            except Exception as exc:
                reason = " ".join(_clean(str(exc), upload_path, "").split())
                raise HTTPException(422, f"{what} is not a valid NIfTI file ({type(exc).__name__}: {reason})") from None

    def check_label(self, image_id: str, image_path: str, upload_path: str, segment_names: Segments | None = None) -> str:
        """Validates an uploaded label; returns the file to store: the upload itself, or a copy
        with its values translated when ``segment_names`` (Slicer's or OHIF's label_info) says the
        client numbered the segments its own way."""
        what = f"the uploaded label for {image_id!r}"
        self.check_type(upload_path, what)
        allowed = self.allowed_values()
        check_values = None if segment_names else allowed
        nifti = (".nii", ".nii.gz")
        if volume_suffix(upload_path) in nifti and volume_suffix(image_path) in nifti:
            values = self._read_nifti_label(image_id, image_path, upload_path, check_values, what)
        else:
            try:
                image = self._image(image_path)
            except VolumeError as exc:
                raise HTTPException(409, f"image {image_id!r} in the datastore is unreadable, so no label can be checked against it: {exc}") from None
            try:
                values = read_label(upload_path, image, check_values)
            except VolumeError as exc:
                raise HTTPException(422, _clean(str(exc), upload_path, what)) from None
        if not segment_names:
            return upload_path
        table = value_table(values, segment_names, self.label_map(), allowed is not None, what)
        try:
            validate_label_values(values if table is None else table[values.astype(np.int64)], what, allowed)
        except VolumeError as exc:
            raise HTTPException(422, str(exc)) from None
        return upload_path if table is None else rewrite_values(upload_path, table)

    def check_image(self, upload_path: str, final_label: str | None = None) -> None:
        """``final_label``: the label of the image this upload replaces; it must still fit."""
        what = "the uploaded image"
        self.check_type(upload_path, what)
        try:
            volume = read_volume(upload_path)
        except VolumeError as exc:
            raise HTTPException(422, _clean(str(exc), upload_path, what)) from None
        if final_label:
            try:
                read_label(final_label, volume)
            except VolumeError as exc:
                raise HTTPException(
                    409, f"{what} does not fit the image's existing final label ({_clean(str(exc), upload_path, what)}); "
                    "delete the label first to replace the image with another geometry",
                ) from None


def rewrite_values(path: str, table: np.ndarray) -> str:
    """A copy of the label file ``path`` with every voxel value v replaced by table[v]; the header
    (geometry, NRRD fields) is kept as it was. Written beside ``path``; the caller removes it."""
    suffix = volume_suffix(path)
    fd, out = tempfile.mkstemp(prefix="remapped-", suffix=suffix, dir=os.path.dirname(path))
    os.close(fd)
    if suffix in (".nii", ".nii.gz"):
        img = nib.load(path)
        nib.save(label_nifti(table[np.rint(np.asanyarray(img.dataobj)).astype(np.int64)], img.affine, img.header), out)
    else:
        import nrrd

        data, header = nrrd.read(path)
        data = table[np.rint(data).astype(np.int64)]
        dtype = np.uint8 if data.max(initial=0) < 256 else np.uint16
        nrrd.write(out, data.astype(dtype), {k: v for k, v in header.items() if k != "type"})
    return out
