"""Checks on what clients send, made before anything reaches the datastore or the bank.

Every rejection is an ``HTTPException`` with a 4xx status and a message a user can act on:

* 400: an id or tag that is not a plain name (path traversal, separators, hidden names);
* 404: an image id the datastore does not have;
* 415: an upload whose file type is not a volume format the datastore stores;
* 422: an upload of the right type that cannot be used: unreadable or not 3D, a label whose shape
  or affine differs from its image, non-integer values, values outside the configured labels.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
from fastapi import HTTPException

from fewshot.volume import Volume, VolumeError, read_label, read_volume

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
    if problems:
        raise HTTPException(400, f"invalid {what} {value!r}: it {' and '.join(problems)}; ids are plain file names")
    return value


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


class UploadValidator:
    """Validates uploads against the datastore's images. Images read for the check are kept in a
    small cache (keyed by path, size and mtime) so saving several labels for one image is fast."""

    def __init__(self, allowed_values: Callable[[], Sequence[int] | None], cache_size: int = 2):
        self.allowed_values = allowed_values
        self.cache_size = cache_size
        self._images: OrderedDict[tuple, Volume] = OrderedDict()
        self._lock = threading.Lock()

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

    def check_label(self, image_id: str, image_path: str, upload_path: str) -> None:
        what = f"the uploaded label for {image_id!r}"
        self.check_type(upload_path, what)
        try:
            image = self._image(image_path)
        except VolumeError as exc:
            raise HTTPException(409, f"image {image_id!r} in the datastore is unreadable, so no label can be checked against it: {exc}") from None
        try:
            read_label(upload_path, image, self.allowed_values())
        except VolumeError as exc:
            raise HTTPException(422, _clean(str(exc), upload_path, what)) from None

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
