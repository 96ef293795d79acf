"""DICOM SEG reading and writing, and nothing of the PACS or the datastore: a label on its series'
grid becomes a SEG that references the series (frames for the annotated slices only, the series'
frame of reference: ``label_to_seg``), a SEG becomes a label numbered by the app's label values with
what was annotated (``seg_to_label``), when a SEG was made (``seg_stamp``), and which SEG labels
which series (``SegIndex``).
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Mapping

import nibabel as nib
import numpy as np
import pydicom
from fastapi import HTTPException
from monailabel.datastore.utils.colors import GENERIC_ANATOMY_COLORS
from monailabel.datastore.utils.convert import nifti_to_dicom_seg
from pydicom.dataset import Dataset

from fewshot.annotation import Annotation
from fewshot.files import write_json_atomic
from fewshot.volume import label_nifti

SEG_SERIES_DESCRIPTION = "Few-shot app: final label"
DEFAULT_COLOR = (255, 0, 0)


def seg_stamp(ds: Dataset) -> str:
    """When a SEG was made, as a sortable string (its Series, else Content, else Instance Creation date and time)."""
    for date_key, time_key in (("SeriesDate", "SeriesTime"), ("ContentDate", "ContentTime"), ("InstanceCreationDate", "InstanceCreationTime")):
        date = str(ds.get(date_key, "") or "").strip()
        if date:
            whole, _, fraction = str(ds.get(time_key, "") or "").strip().partition(".")
            return f"{date}{whole.ljust(6, '0')}.{fraction.ljust(6, '0')}"
    return ""


def seg_frame_slices(ds: Dataset, image_path: str) -> list[int]:
    """The image slice (index along the series' third voxel axis) of each frame of a SEG, in frame order."""
    import SimpleITK as sitk

    ref = sitk.ReadImage(image_path)
    out = []
    for item in ds.get("PerFrameFunctionalGroupsSequence") or []:
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        out.append(int(round(ref.TransformPhysicalPointToContinuousIndex(position)[2])))
    return out


def keep_frames(ds: Dataset, frame_slices: list[int], keep: set[int]) -> None:
    """Drops a binary SEG's frames whose slice is not in ``keep`` (1-bit frames are packed end to end)."""
    from pydicom.pixel_data_handlers.numpy_handler import pack_bits

    chosen = [i for i, z in enumerate(frame_slices) if z in keep]
    if len(chosen) == len(frame_slices):
        return
    frames = ds.pixel_array.reshape(len(frame_slices), int(ds.Rows), int(ds.Columns))
    items = list(ds.PerFrameFunctionalGroupsSequence)
    ds.PixelData = pack_bits(np.ascontiguousarray(frames[chosen]).ravel())
    ds.NumberOfFrames = len(chosen)
    ds.PerFrameFunctionalGroupsSequence = [items[i] for i in chosen]


def label_to_seg(image_id: str, label_path: str, series_dir: Path, label_map: Mapping[str, int],
                 annotation: Annotation | None = None) -> Dataset:
    """The label as a DICOM SEG referencing its series (the DICOM instances in ``series_dir``). Every
    slice gets a frame per segment (an empty frame says "annotated, nothing there"), except the slices
    a partial label leaves unannotated: those get none, which is how any reader tells."""
    import SimpleITK as sitk

    values = [int(v) for v in np.unique(sitk.GetArrayFromImage(sitk.ReadImage(label_path))) if v]
    if not values:
        raise HTTPException(422, f"the label for {image_id!r} is empty: a final label needs at least one labelled voxel (a DICOM SEG holds segments)")
    names = {int(v): n for n, v in label_map.items()}
    # One entry per value present, in the order nifti_to_dicom_seg reads them (sorted values).
    segments = []
    for value in values:
        name = names.get(value, str(value))
        color = GENERIC_ANATOMY_COLORS.get(name) or GENERIC_ANATOMY_COLORS.get(name.replace("_", " ")) or DEFAULT_COLOR
        segments.append({"name": name, "description": name, "color": list(color), "model_name": SEG_SERIES_DESCRIPTION})
    try:
        seg_file = nifti_to_dicom_seg(str(series_dir), label_path, segments, use_itk=False)
    except Exception as exc:
        raise HTTPException(422, f"the label for {image_id!r} cannot be encoded as DICOM SEG ({type(exc).__name__}: {exc})") from None
    if not seg_file:  # its way of saying it found no segment
        raise HTTPException(422, f"the label for {image_id!r} cannot be encoded as DICOM SEG: no segment found in it")
    try:
        ds = pydicom.dcmread(seg_file)
    finally:
        os.unlink(seg_file)
    if annotation is not None and annotation.slices is not None and annotation.axis == 2:
        keep_frames(ds, seg_frame_slices(ds, label_path), set(annotation.slices))
    source = pydicom.dcmread(str(next(series_dir.iterdir())), stop_before_pixels=True)
    # pydicom-seg gives the SEG a new frame of reference; viewers (OHIF) overlay a SEG on the
    # series sharing its frame of reference.
    if source.get("FrameOfReferenceUID"):
        ds.FrameOfReferenceUID = source.FrameOfReferenceUID
    ds.SeriesDescription = SEG_SERIES_DESCRIPTION
    return ds


def seg_to_label(image_id: str, image_path: str, seg_dir: Path, out: Path,
                 label_map: Mapping[str, int]) -> tuple[str, Annotation]:
    """A SEG as a label on its image's voxel grid, segments numbered by the app's label values
    (a segment whose SegmentLabel names a label gets that label's value, others keep their number)."""
    import pydicom_seg
    import SimpleITK as sitk

    files = sorted(p for p in seg_dir.iterdir() if p.is_file())
    if len(files) != 1:
        raise HTTPException(422, f"SEG series of {image_id} has {len(files)} instances; one multi-frame SEG instance is expected")
    try:
        result = pydicom_seg.MultiClassReader().read(pydicom.dcmread(str(files[0])))
    except Exception as exc:
        raise HTTPException(422, f"SEG of series {image_id} cannot be read as a label map ({type(exc).__name__}: {exc})") from None
    seg, ref = result.image, sitk.ReadImage(image_path)
    # A SEG may hold only the slices that have segments: it must lie on the image's grid.
    offset = np.asarray(ref.TransformPhysicalPointToContinuousIndex(seg.GetOrigin()))
    aligned = (
        np.allclose(seg.GetSpacing(), ref.GetSpacing(), rtol=1e-3, atol=1e-3)
        and np.allclose(seg.GetDirection(), ref.GetDirection(), atol=1e-3)
        and np.allclose(offset, np.rint(offset), atol=1e-2)
    )
    if not aligned:
        raise HTTPException(
            422, f"SEG of series {image_id} does not lie on the series' voxel grid (spacing {seg.GetSpacing()} vs "
            f"{ref.GetSpacing()}, origin at voxel {np.round(offset, 3).tolist()})",
        )
    # The frames it holds are the slices that were annotated; a slice without one was not looked at.
    frames = set(seg_frame_slices(pydicom.dcmread(str(files[0]), stop_before_pixels=True), image_path))
    slices = None if frames >= set(range(ref.GetSize()[2])) else tuple(sorted(frames))
    on_grid = sitk.Resample(seg, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, seg.GetPixelID())
    numbers = sitk.GetArrayFromImage(on_grid).transpose(2, 1, 0).astype(np.int64)  # (x, y, z) as nibabel reads
    table = np.arange(max(int(numbers.max(initial=0)), max(result.segment_infos, default=0)) + 1, dtype=np.int64)
    for number, segment in result.segment_infos.items():
        name = str(segment.get("SegmentLabel", "") or "")
        if name in label_map:
            table[int(number)] = int(label_map[name])
    image = nib.load(image_path)
    nib.save(label_nifti(table[numbers], image.affine, image.header), out)
    declared = {int(table[int(n)]) for n in result.segment_infos}
    labels = None if not label_map or declared >= set(label_map.values()) else tuple(sorted(declared))
    return str(out), Annotation(slices=slices, axis=2, labels=labels, how="SEG frames and segments")


class SegIndex:
    """SEG SeriesInstanceUID -> the image series it labels, when it was made and its study: what the
    sync needs to pick each series' latest SEG. DICOM instances never change, so each SEG's metadata
    is read once, then kept here (``seg-series.json``; a read-only process keeps it in memory)."""

    def __init__(self, path: Path, persist: bool = True):
        self.path = path
        self.persist = persist
        self._lock = threading.Lock()
        self._refs = self._load()

    def _load(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, seg_uid: str) -> dict | None:
        with self._lock:
            ref = self._refs.get(seg_uid)
            return dict(ref) if ref is not None else None

    def remember(self, seg_uid: str, image_id: str | None, stamp: str, study: str) -> None:
        with self._lock:
            self._refs[seg_uid] = {"image": image_id, "stamp": stamp, "study": study}
            if self.persist:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(self.path, self._refs, sort_keys=True, fsync=False)
