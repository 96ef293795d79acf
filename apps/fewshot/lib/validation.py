"""Checks on what clients send, made before anything reaches the datastore or the bank.

Every rejection is an ``HTTPException`` with a 4xx status and a message a user can act on:

* 400: an id or tag that is not a plain name (path traversal, separators, hidden names), a case
  variant of a reserved tag (``Final``), params or info that are not a JSON object, client strings
  longer than the datastore and the log should keep (see ``check_client_json``);
* 404: an image id the datastore does not have;
* 415: an upload whose file type is not a volume format the datastore stores;
* 413: an image (stored, or uploaded to ``/infer``) whose header announces more voxel data than
  the server's budget (``-c max_volume_mb``), refused before it is decompressed;
* 422: an upload of the right type that cannot be used: unreadable or not 3D, complex or RGB
  voxels, NaN or infinite values (an image's are checked as they stream past, never held whole in
  memory), a label whose shape or affine differs from its image, non-integer values, values outside
  the configured labels, a ``label_info`` that is not a list of segments, and what
  ``lib.file_checks`` finds (sform and qform that disagree, data after the voxels, more voxels than
  the header's or the image's).
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
from monailabel.interfaces.datastore import DefaultLabelTag

from fewshot.volume import (MAX_VOXELS, Volume, VolumeError, check_header, check_label_geometry, label_nifti, read_header, read_label,
                            read_volume, validate_label_values)
from lib.app_config import DEFAULT_MAX_VOLUME_MB
from lib.file_checks import TooLarge, check_before_reading, disagreeing_geometry, nifti_bytes, nifti_voxels
from lib.labels import Segments, value_table

logger = logging.getLogger(__name__)

# Client strings the datastore's index stores or MONAI Label logs are bounded: a 1 MB client_id was
# stored in the index by every /activelearning request and logged several times over. Ids, names
# and keys: a file name's length.
MAX_ID_LENGTH = 255
# An image id becomes file names: ``<id>.nii.gz`` for the image and each of its labels. A file name
# holds at most 255 bytes (ext4, xfs, btrfs, tmpfs), so an id may take 255 - len(".nii.gz") bytes in
# UTF-8 (120 x "é" is 240 bytes); every other name derived from it (temporary files, bank shards) is
# shortened to fit.
MAX_ID_BYTES = 255 - len(".nii.gz")
MAX_JSON_DEPTH = 32  # nesting of one params/info value: enough for any client, far below Python's recursion limit
MAX_TEXT_LENGTH = 4096  # any other string value (a note in an image's info)
MAX_JSON_BYTES = 64 * 1024  # one params/info field, and all the info kept for one image or label
NAME_KEYS = ("client_id", "name")  # their values are ids or names (a label's name in label_info)
TAG_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESERVED_TAGS = tuple(t.value for t in DefaultLabelTag)  # original, final
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
    elif what == "image id" and len(value.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        problems.append(f"is {len(value.encode('utf-8', 'surrogatepass'))} bytes long in UTF-8, more than the {MAX_ID_BYTES} "
                        "that leave room for its file extension in a file name (255 bytes)")
    if any(ord(c) < 32 for c in value):
        problems.append("contains control characters")
    if what == "image id" and any(s in value.lower() for s in (".nii", ".nrrd")):
        # MONAI Label's _to_id removes the file's extension wherever it occurs in the name, so such
        # an id would be stored under one name and listed under another.
        problems.append("contains a file extension (.nii, .nrrd)")
    if problems:
        raise HTTPException(400, f"invalid {what} {quoted(value)}: it {' and '.join(problems)}; ids are plain file names")
    return value


def quoted(value: str, keep: int = 60) -> str:
    """A client's string in a message: its start, not a megabyte of it."""
    return repr(value) if len(value) <= keep else f"{value[:keep]!r}... ({len(value)} characters)"


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
        except (TypeError, ValueError, RecursionError) as exc:
            raise HTTPException(400, f"{what} is not valid JSON ({exc}); send a JSON object, e.g. {{}}") from None
    check_depth(value, what)
    check_info(value, what)
    return check_client_json(value, what)


def check_client_json(value: Any, what: str) -> Any:
    """A client's JSON (params, info, a request body) that MONAI Label logs or the datastore stores:
    at most MAX_JSON_DEPTH levels deep (checked first: deeper values break code that walks them
    recursively), at most MAX_JSON_BYTES, keys and names (``client_id``, ``name``) at most
    MAX_ID_LENGTH characters, other strings at most MAX_TEXT_LENGTH."""
    check_depth(value, what)
    size = len(json.dumps(value, default=str))
    if size > MAX_JSON_BYTES:
        raise HTTPException(400, f"{what} is {size} bytes of JSON; at most {MAX_JSON_BYTES} are accepted")
    stack = [(value, None)]
    while stack:
        item, key = stack.pop()
        if key == "client_id" and item is not None and not isinstance(item, str):
            raise HTTPException(400, f"{what}: client_id must be a string, not {type(item).__name__}")
        if isinstance(item, dict):
            for k, v in item.items():
                if len(str(k)) > MAX_ID_LENGTH:
                    raise HTTPException(400, f"{what}: key {quoted(str(k))} is longer than {MAX_ID_LENGTH} characters")
                stack.append((v, k))
        elif isinstance(item, list):
            stack.extend((v, key) for v in item)
        elif isinstance(item, str):
            limit = MAX_ID_LENGTH if key in NAME_KEYS else MAX_TEXT_LENGTH
            if len(item) > limit:
                raise HTTPException(400, f"{what}: {key!r} is {len(item)} characters long; at most {limit} are accepted "
                                         f"{'for an id or a name' if key in NAME_KEYS else 'for a text value'}")
    return value


def check_depth(value: Any, what: str, limit: int = MAX_JSON_DEPTH) -> None:
    """400 when objects and lists nest deeper than ``limit`` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, (list, tuple)) else ()
        if children and depth > limit:
            raise HTTPException(400, f"{what} nests objects or lists more than {limit} levels deep; send a flatter JSON value")
        stack.extend((child, depth + 1) for child in children)


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
        shown = quoted(tag) if isinstance(tag, str) else repr(tag)
        raise HTTPException(400, f"invalid label tag {shown}: use letters, digits, '_', '-' (e.g. final)")
    reserved = next((r for r in RESERVED_TAGS if tag.lower() == r and tag != r), None)
    if reserved:
        # On a case-insensitive file system (macOS, Windows shares) labels/Final is labels/final.
        raise HTTPException(400, f"invalid label tag {tag!r}: it differs from the reserved tag {reserved!r} only by case; "
                                 f"use {reserved!r} itself or another name")
    return tag


def volume_suffix(path: str) -> str | None:
    lower = path.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    return None


def _clean(message: str, upload_path: str, what: str, others: dict[str, str] | None = None) -> str:
    """Error messages name the user's upload, not the server's temporary file; first line only
    (readers append installation advice that does not apply to a corrupt file). ``others``: more
    server paths (a datastore file) -> what to call them."""
    first = message.strip().splitlines()[0] if message.strip() else "unreadable"
    return clean_paths(first, {upload_path: what, **(others or {})})


def clean_paths(message: str, names: dict[str, str]) -> str:
    """``message`` with each server path in ``names`` replaced by what a client calls it, and any
    other path in the temporary folder by "a temporary file"."""
    for path, name in sorted(names.items(), key=lambda kv: -len(kv[0])):
        if path:
            message = message.replace(f"{path}: ", f"{name}: ").replace(path, name)
    return TEMP_PATH.sub("a temporary file", message)


_TEMP_DIRS = sorted({tempfile.gettempdir(), os.path.realpath(tempfile.gettempdir())}, key=len, reverse=True)
TEMP_PATH = re.compile("(?:" + "|".join(re.escape(d) for d in _TEMP_DIRS) + r")/[^\s'\",:;)\]]*")


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
        max_volume_bytes: int = DEFAULT_MAX_VOLUME_MB << 20,
    ):
        self.allowed_values = allowed_values
        self.label_map = label_map
        self.cache_size = cache_size
        self.max_volume_bytes = int(max_volume_bytes)
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

    def _read_nifti_label(self, image_id: str, image_path: str, upload_path: str, img, allowed, what: str) -> np.ndarray:
        """``img``: the upload loaded by nibabel (header only). Its voxels are decoded once, bounded
        by the image's size (checked first) and refused if anything follows them."""
        try:
            shape, affine = self._nifti_geometry(image_path)
        except Exception as exc:
            raise HTTPException(409, f"image {image_id!r} in the datastore is unreadable, so no label can be checked against it: "
                                     f"{_clean(str(exc), image_path, f'image {image_id!r}')}") from None
        try:
            label_shape = _spatial(img.shape)
            if len(label_shape) != 3:
                raise VolumeError(f"{what}: expected a 3D image, got {len(label_shape)}D with shape {label_shape}")
            check_label_geometry(what, label_shape, img.affine, shape, affine)
            data = nifti_bytes(upload_path, img, what, keep=True)
            voxels = np.asanyarray(img.dataobj) if data is None else nifti_voxels(data, img)
            return validate_label_values(voxels.reshape(label_shape), what, allowed)
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
    def check_type(upload_path: str, what: str) -> nib.Nifti1Image | None:
        """The upload's format, from its name and header; returns a NIfTI upload loaded by nibabel
        (header read, voxels not), None for NRRD."""
        suffix = volume_suffix(upload_path)
        if suffix is None:
            found = "".join(Path(Path(upload_path).name).suffixes) or "no extension"
            raise HTTPException(415, f"{what} has file type {found!r}; upload a 3D volume as {', '.join(VOLUME_SUFFIXES)}")
        if suffix not in (".nii", ".nii.gz"):
            return None
        # The header alone tells a corrupt or truncated upload apart, with nibabel's precise reason.
        try:
            img = nib.load(upload_path)
            img.header
        except Exception as exc:
            reason = " ".join(_clean(str(exc), upload_path, "").split())
            raise HTTPException(422, f"{what} is not a valid NIfTI file ({type(exc).__name__}: {reason})") from None
        # Refused, not rewritten with one of the two: which one the client meant is not ours to guess
        # (its viewer may have shown the other one).
        disagreement = disagreeing_geometry(img.header)
        if disagreement:
            raise HTTPException(422, f"{what}: {disagreement}")
        dtype = img.get_data_dtype()
        if dtype.kind not in "biuf":
            # Readers keep the real part of complex voxels (numpy warns, nothing else does) and
            # split RGB ones: what would be stored or segmented is not what the file holds.
            kind = "complex" if dtype.kind == "c" else "RGB or structured" if dtype.fields else str(dtype)
            raise HTTPException(422, f"{what} holds {kind} voxels ({dtype}); send real numbers (a label: integer values)")
        return img

    def check_label(self, image_id: str, image_path: str, upload_path: str, segment_names: Segments | None = None) -> str:
        """Validates an uploaded label; returns the file to store: the upload itself, or a copy
        with its values translated when ``segment_names`` (Slicer's or OHIF's label_info) says the
        client numbered the segments its own way."""
        what = f"the uploaded label for {image_id!r}"
        img = self.check_type(upload_path, what)
        allowed = self.allowed_values()
        check_values = None if segment_names else allowed
        if img is not None and volume_suffix(image_path) in (".nii", ".nii.gz"):
            values = self._read_nifti_label(image_id, image_path, upload_path, img, check_values, what)
        else:
            try:
                image = self._image(image_path)
            except VolumeError as exc:
                raise HTTPException(409, f"image {image_id!r} in the datastore is unreadable, so no label can be checked against it: "
                                         f"{_clean(str(exc), image_path, f'image {image_id!r}')}") from None
            try:
                check_before_reading(upload_path, img, what, int(np.prod(image.shape)), "its image has")
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

    def check_volume(self, upload_path: str, what: str = "the uploaded image", voxels: bool = False) -> bool:
        """An uploaded image, from its header and without keeping its voxels: a volume format,
        real voxel values, within the budget (413, before anything is decompressed), and nothing
        after its voxels. ``voxels``: the values are checked too as they stream past (no NaN or
        infinity); returns whether they were (see ``check_before_reading``)."""
        img = self.check_type(upload_path, what)
        try:
            streamed = check_before_reading(upload_path, img, what, MAX_VOXELS, "this server accepts for an image",
                                            self.max_volume_bytes, voxels=voxels)
            if streamed:
                check_header(upload_path, read_header(upload_path))
        except TooLarge as exc:
            raise HTTPException(413, _clean(str(exc), upload_path, what)) from None
        except VolumeError as exc:
            raise HTTPException(422, _clean(str(exc), upload_path, what)) from None
        return streamed

    def check_image(self, upload_path: str, final_label: str | None = None) -> None:
        """An image to store. ``final_label``: the label of the image this upload replaces; it must
        still fit. Checked from headers and as its voxels stream past, never held whole in memory;
        only a text-encoded NRRD is read whole by the engine's reader."""
        what = "the uploaded image"
        if not self.check_volume(upload_path, what, voxels=True):
            try:
                read_volume(upload_path)
            except VolumeError as exc:
                raise HTTPException(422, _clean(str(exc), upload_path, what)) from None
        if not final_label:
            return
        try:
            image, label = read_header(upload_path), read_header(final_label)
            if image is not None and label is not None and image.affine is not None and label.affine is not None:
                check_label_geometry(final_label, label.shape, label.affine, image.shape, image.affine)
            else:  # a header that does not give the affine as the engine's reader does: read them
                read_label(final_label, read_volume(upload_path))
        except VolumeError as exc:
            raise HTTPException(
                409, f"{what} does not fit the image's existing final label "
                f"({_clean(str(exc), upload_path, what, {final_label: 'the final label'})}); "
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
