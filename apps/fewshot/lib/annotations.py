"""Partial annotations as a client states them in a label save's ``params``, and where they are kept.

A final label saved with any of these params is partial (see ``fewshot.annotation``):

* ``annotated_slices``: the slices the user annotated, indices along ``annotated_axis`` (0, 1 or
  2; default 2, the third voxel axis: a DICOM series' instance order, Slicer's K);
* ``partial: true`` without ``annotated_slices``: the annotated slices are those holding any
  labelled voxel (what a brush touched: a slice erased to nothing is not told apart);
* ``annotated_labels``: the label names (or values) annotated; the others are unknown, not absent.

The parsed :class:`Annotation` is kept in the label's info in the datastore's index, under
``annotation``, beside the file it describes (one index transaction writes both), and the
ingestion worker reads it from there. A label saved without these params is complete.
"""
from __future__ import annotations

from typing import Any, Mapping

import nibabel as nib
import numpy as np
from fastapi import HTTPException

from fewshot.annotation import DEFAULT_AXIS, Annotation, AnnotationError

INFO_KEY = "annotation"  # in a final label's info: set by the server, never by a client
PARAM_KEYS = ("partial", "annotated_slices", "annotated_axis", "annotated_labels")


def _ints(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise HTTPException(400, f"params {what} must be a list of whole numbers, not {str(value)[:60]!r}")
    return value


def requested(params: Mapping[str, Any]) -> bool:
    return any(params.get(k) not in (None, False) for k in PARAM_KEYS)


def parse(params: Mapping[str, Any], label_map: Mapping[str, int], label_path: str) -> Annotation | None:
    """The annotation a save's params state, checked against the stored label (400 for a malformed
    param, 422 for one the label contradicts); None for a complete label."""
    if INFO_KEY in params:
        raise HTTPException(400, f"params may not set {INFO_KEY!r}: the server records it; send annotated_slices, "
                                 "annotated_labels or partial")
    if not requested(params):
        return None
    axis = params.get("annotated_axis", DEFAULT_AXIS)
    if type(axis) is not int or axis not in (0, 1, 2):
        raise HTTPException(400, f"params annotated_axis must be 0, 1 or 2, not {str(axis)[:60]!r}")
    partial = params.get("partial", False)
    if not isinstance(partial, bool):
        raise HTTPException(400, f"params partial must be true or false, not {str(partial)[:60]!r}")
    labels = None
    if params.get("annotated_labels") is not None:
        raw = params["annotated_labels"]
        if not isinstance(raw, list) or not raw:
            raise HTTPException(400, "params annotated_labels must be a non-empty list of label names or values")
        labels, unknown = set(), []
        for item in raw:
            if type(item) is int and item > 0:
                labels.add(item)
            elif isinstance(item, str) and item in label_map:
                labels.add(int(label_map[item]))
            else:
                unknown.append(item)
        if unknown:
            raise HTTPException(422, f"params annotated_labels {str(unknown)[:120]} are not labels of this app "
                                     f"({sorted(label_map) or 'none configured: give values'})")
        labels = tuple(sorted(labels))
    data = np.asanyarray(nib.load(label_path).dataobj)
    if params.get("annotated_slices") is not None:
        slices = tuple(sorted(set(_ints(params["annotated_slices"], "annotated_slices"))))
        how = "params annotated_slices"
        if not slices:
            raise HTTPException(400, "params annotated_slices is empty: a label with no annotated slice says nothing")
    elif partial:
        moved = np.moveaxis(data, axis, 0).reshape(data.shape[axis], -1)
        slices = tuple(int(z) for z in np.flatnonzero(moved.any(axis=1)))
        how = "params partial: the slices holding labelled voxels"
        if not slices:
            raise HTTPException(422, "params partial: the label holds no labelled voxel, so no slice was annotated")
    else:
        slices, how = None, "params annotated_labels"
    try:
        annotation = Annotation(slices=slices, axis=axis, labels=labels, how=how).check(data.shape)
    except AnnotationError as exc:
        raise HTTPException(422, f"params: {exc}") from None
    # Voxels on slices not listed (an inference result the user did not review) are kept in the file
    # as sent, but never enter the bank.
    return annotation


def of(info: Mapping[str, Any] | None) -> Annotation:
    """The annotation recorded in a final label's info (complete when none was)."""
    return Annotation.from_dict((info or {}).get(INFO_KEY))
