"""Volumes in and labels out, with their geometry kept exact.

Reading goes through MONAI's ``LoadImage`` (NIfTI, NRRD, DICOM series, ...). The engine works on
*canvas slices*: the volume is oriented to RAS, cut along its slicing axis, intensity-normalised,
resampled in plane to one pixel spacing for every volume (one physical scale per bank) and placed
on an S x S canvas (centred; a field of view wider than S x spacing is cropped around the body, and
a body wider than that is reported). ``CanvasGeometry``
remembers every step so that a canvas label goes back to the input's exact array shape, affine and
orientation, and maps canvas slice numbers to the file's own slice numbers.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations as nio

from fewshot.decision import LabelDecision
from fewshot.files import atomic_path
from fewshot.settings import IntensitySettings, VolumeSettings

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Anything with these suffixes (or a directory of DICOM files) is handed to MONAI's LoadImage.
IMAGE_SUFFIXES = NIFTI_SUFFIXES + (".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
RAS = nio.axcodes2ornt(("R", "A", "S"))


class VolumeError(ValueError):
    """A file that cannot be used as a volume or label; the message says which file and why."""


@dataclass
class Volume:
    """A 3D image as read from disk: array in the file's own axis order, plus its geometry."""

    array: np.ndarray  # (X, Y, Z) float32, file array order
    affine: np.ndarray  # 4x4 voxel -> world (RAS, mm)
    path: str
    header: nib.Nifti1Header | None = None  # kept for NIfTI inputs so labels copy qform/sform exactly

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)

    def content_hash(self) -> str:
        """Identifies the voxels and geometry, for caches that must not outlive a changed file."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.array).tobytes())
        h.update(np.asarray(self.affine, dtype=np.float64).tobytes())
        return h.hexdigest()[:24]


def _is_nifti(path: str) -> bool:
    return path.lower().endswith(NIFTI_SUFFIXES)


def needs_monai_reader(path: str | os.PathLike) -> bool:
    """Whether reading ``path`` imports MONAI's reader (~10 s of CPU, once per process): everything but
    a NIfTI file, which nibabel reads directly."""
    path = str(path)
    return not (_is_nifti(path) and os.path.isfile(path))


def _read_nifti(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A NIfTI file's voxels (float32) and affine exactly as MONAI's NibabelReader gives them, without
    importing MONAI. None when MONAI would correct the header first (pixdim disagreeing with the
    affine's column norms: its correct_nifti_header_if_necessary), so that its own correction runs."""
    img = nib.load(path)
    dim = int(img.header["dim"][0])
    if dim < 5:
        spacing = np.sqrt(np.sum(np.asarray(img.affine, np.float64)[:dim, :dim] ** 2, axis=0))
        spacing[spacing == 0] = 1.0
        if not np.allclose(np.asarray(img.header.get_zooms())[:dim], spacing):
            return None
    array = np.asanyarray(img.dataobj, order="C").astype(np.float32, copy=False)
    return array, np.array(img.affine, dtype=np.float64)


# 1024^3 voxels: above any clinical series (512 x 512 x 2000 is half of it); held as float32, this is
# already 4 GB. A header announcing more is refused before a byte of voxel data is decompressed.
MAX_VOXELS = 2**30


@dataclass(frozen=True)
class VolumeHeader:
    """What a file's header announces, read without its voxel data."""

    shape: tuple[int, ...]  # trailing singleton axes dropped, as ``read_volume`` drops them
    dtype: np.dtype
    affine: np.ndarray | None  # as the engine's reader gives it; None where only the full read knows (NRRD)

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def spatial_shape(shape) -> tuple[int, ...]:
    """Trailing singleton axes (a 4D NIfTI with one time point) dropped: they are harmless."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def read_header(path: str | os.PathLike) -> VolumeHeader | None:
    """The header of a NIfTI or NRRD file, its voxels left unread; None for other formats (their
    readers read everything). Raises VolumeError when the file has no readable header."""
    path = str(path)
    try:
        if _is_nifti(path):
            img = nib.load(path)
            # MONAI's NibabelReader gives nibabel's affine as it is (no reorientation).
            return VolumeHeader(spatial_shape(img.shape), np.dtype(img.get_data_dtype()), np.asarray(img.affine, dtype=np.float64))
        if path.lower().endswith(".nrrd"):
            try:
                import nrrd
                from nrrd.reader import _determine_datatype
            except ImportError:  # pynrrd comes with MONAI Label; without it NRRD is read whole by ITK
                return None
            header = nrrd.read_header(path)
            return VolumeHeader(spatial_shape(header["sizes"]), np.dtype(_determine_datatype(header)), _nrrd_affine(path, header))
    except VolumeError:
        raise
    except Exception as exc:
        raise VolumeError(f"{path}: not a readable medical image ({type(exc).__name__}: {exc})") from None
    return None


def _nrrd_affine(path: str, header: Mapping) -> np.ndarray | None:
    """The affine MONAI's NrrdReader gives an NRRD header (its directions and origin, LPS turned to
    RAS); None for a layout it does not describe as one 3D grid."""
    for key in ("space directions", "space origin"):
        if header.get(key) is None:
            raise VolumeError(f"{path}: not a readable medical image (its NRRD header has no {key!r} field)")
    directions = np.asarray(header["space directions"], dtype=np.float64)
    origin = np.asarray(header["space origin"], dtype=np.float64)
    if directions.shape != (3, 3) or origin.shape != (3,):
        return None
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = directions.T, origin
    if header.get("space", "left-posterior-superior") == "left-posterior-superior":
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    return affine


def check_header(path: str, header: VolumeHeader, max_voxels: int = MAX_VOXELS) -> None:
    """What a header alone shows to be unusable: voxels that are not real numbers, not 3D, no
    voxels, more than ``max_voxels``, no usable affine."""
    dtype = header.dtype
    if dtype.kind not in "biuf":
        # Readers keep the real part of complex voxels (numpy warns, nothing else does) and split
        # RGB ones: what would be segmented or learnt from is not what the file holds.
        kind = "complex" if dtype.kind == "c" else "RGB or structured" if dtype.fields else str(dtype)
        raise VolumeError(f"{path}: holds {kind} voxels ({dtype}); an image must hold real numbers and a label "
                          "integer class values (a reader would silently keep only the real part)")
    shape = header.shape
    if len(shape) != 3:
        raise VolumeError(f"{path}: expected a 3D image, got {len(shape)}D with shape {shape}")
    if 0 in shape:
        raise VolumeError(f"{path}: the image has no voxels (shape {shape})")
    if 1 in shape:
        raise VolumeError(f"{path}: expected a 3D image, got a 2D image stored as 3D (shape {shape})")
    if header.voxels > max_voxels:
        raise VolumeError(f"{path}: its header announces {header.voxels} voxels (shape {shape}), more than the "
                          f"{max_voxels} read here; nothing was decompressed")
    affine = header.affine
    if affine is not None and (affine.shape != (4, 4) or not np.all(np.isfinite(affine))
                               or abs(np.linalg.det(affine[:3, :3])) < 1e-9):
        raise VolumeError(f"{path}: the image has no usable voxel-to-world affine")


def all_finite(array: np.ndarray) -> bool:
    """No NaN or infinity, without a boolean copy of the volume: the float64 sum of float32 values
    cannot overflow, and is finite exactly when every value is."""
    return bool(np.isfinite(array.sum(dtype=np.float64)))


def read_volume(path: str | os.PathLike, max_voxels: int = MAX_VOXELS) -> Volume:
    """Read and validate a 3D image. Raises VolumeError with a message a user can act on.

    A NIfTI or NRRD header is checked first (voxel type, dimensions, voxel count against
    ``max_voxels``), so a file that cannot be used costs no decompression."""
    path = str(path)
    if not os.path.exists(path):
        raise VolumeError(f"{path}: no such file")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise VolumeError(f"{path}: the file is empty")
    announced = read_header(path) if os.path.isfile(path) else None
    if announced is not None:
        check_header(path, announced, max_voxels)
    try:
        read = None if needs_monai_reader(path) else _read_nifti(path)
        if read is None:
            from monai.transforms import LoadImage  # heavy import: only for what nibabel alone does not read

            reader = "NibabelReader" if _is_nifti(path) else None
            image = LoadImage(image_only=True, reader=reader, dtype=np.float32)(path)
            read = np.asarray(image, dtype=np.float32), np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:  # MONAI wraps reader failures in many types
        raise VolumeError(f"{path}: not a readable medical image ({type(exc).__name__}: {exc})") from None
    array, affine = read
    # Trailing singleton axes (e.g. a 4D NIfTI with one time point) are harmless; anything else is not 3D.
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise VolumeError(f"{path}: expected a 3D image, got {array.ndim}D with shape {array.shape}")
    if 1 in array.shape:
        # One slice (H, W, 1) is a 2D image stored in a 3D file: slicing across it would give 1-pixel lines.
        raise VolumeError(f"{path}: expected a 3D image, got a 2D image stored as 3D (shape {array.shape})")
    if min(array.shape) < 1 or array.size == 0:
        raise VolumeError(f"{path}: the image has no voxels (shape {array.shape})")
    if not all_finite(array):
        raise VolumeError(f"{path}: the image holds NaN or infinite values")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(f"{path}: the image has no usable voxel-to-world affine")
    try:
        # MONAI may read a file nibabel refuses (e.g. a plain .nii named .nii.gz, read by ITK);
        # the header is what labels are written with, so nibabel must read it too.
        header = nib.load(path).header.copy() if _is_nifti(path) else None
    except Exception as exc:
        raise VolumeError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    return Volume(array=array, affine=affine, path=path, header=header)


def read_label(path: str | os.PathLike, image: Volume, allowed: Sequence[int] | None = None) -> np.ndarray:
    """Read a label volume and check it belongs to ``image``: same shape and affine, integer values.

    The label's header is checked against the image first: a label for another grid (or a
    decompression bomb) is refused before its voxels are decompressed, and complex voxels are
    refused rather than read without their imaginary part.
    ``allowed``: label values accepted besides 0; others raise. Returns uint16 in the file's array order.
    """
    path = str(path)
    announced = read_header(path) if os.path.isfile(path) else None
    if announced is not None:
        # NRRD: the affine is known only once read (MONAI's reader derives it); its shape is checked now.
        check_label_geometry(path, announced.shape, image.affine if announced.affine is None else announced.affine,
                             image.shape, image.affine)
    label = read_volume(path, max_voxels=int(np.prod(image.shape, dtype=np.int64)))
    check_label_geometry(path, label.shape, label.affine, image.shape, image.affine)
    return validate_label_values(label.array, path, allowed)


# "Same geometry" for a label and its image: affines equal to well below a voxel (mm).
AFFINE_ATOL, AFFINE_RTOL = 1e-3, 1e-4


def check_label_geometry(where: str, label_shape, label_affine, image_shape, image_affine) -> None:
    """A label belongs to an image only on exactly its voxel grid: same shape, same affine."""
    label_shape, image_shape = tuple(int(s) for s in label_shape), tuple(int(s) for s in image_shape)
    if label_shape != image_shape:
        raise VolumeError(f"{where}: label shape {label_shape} does not match image shape {image_shape}")
    if not np.allclose(label_affine, image_affine, atol=AFFINE_ATOL, rtol=AFFINE_RTOL):
        raise VolumeError(
            f"{where}: label geometry (affine) does not match its image; label affine diagonal "
            f"{np.diag(label_affine)[:3].round(3).tolist()}, image {np.diag(image_affine)[:3].round(3).tolist()}"
        )


def validate_label_values(values: np.ndarray, where: str, allowed: Sequence[int] | None = None) -> np.ndarray:
    if np.any(values != np.round(values)):
        raise VolumeError(f"{where}: label values must be integers (found fractional values)")
    if values.min() < 0 or values.max() > np.iinfo(np.uint16).max:
        raise VolumeError(f"{where}: label values must lie in 0..65535 (found {values.min():g}..{values.max():g})")
    out = values.astype(np.uint16)
    if allowed is not None:
        present = np.flatnonzero(np.bincount(out.ravel(), minlength=1))  # linear: no sort of millions of voxels
        unknown = sorted(set(present.tolist()) - {0} - {int(a) for a in allowed})
        if unknown:
            raise VolumeError(f"{where}: label values {unknown} are not among the configured labels {sorted(allowed)}")
    return out


def label_nifti(values: np.ndarray, affine: np.ndarray, header=None) -> nib.Nifti1Image:
    """A label map as a NIfTI image on its image's grid: uint8 when the values fit, else uint16, no
    intensity scaling, and the image's own header (sform/qform exactly as stored) when there is one."""
    dtype = np.uint8 if values.max(initial=0) < 256 else np.uint16
    data = np.asarray(values).astype(dtype)
    if header is None:
        return nib.Nifti1Image(data, affine)
    header = header.copy()
    header.set_data_dtype(dtype)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    # A header without sform/qform codes would make nibabel fall back to a default affine.
    if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        return nib.Nifti1Image(data, affine)
    return nib.Nifti1Image(data, None, header=header)


def write_label(path: str | os.PathLike, label: np.ndarray, image: Volume) -> None:
    """Write a label with exactly the image's shape and affine (its NIfTI header, when it has one).

    Written to a temporary file then renamed, so a crash never leaves a torn label behind; its mode
    is the umask's, as for any file the user writes.
    """
    path = str(path)
    if not _is_nifti(path):
        raise VolumeError(f"{path}: labels are written as NIfTI; name the output .nii.gz or .nii")
    if label.shape != image.shape:
        raise VolumeError(f"label shape {label.shape} does not match image shape {image.shape}")
    out = label_nifti(label, image.affine, image.header)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = ".nii.gz" if path.endswith(".gz") else ".nii"
    with atomic_path(path, suffix) as tmp:  # nibabel creates it with open(): the umask's mode
        nib.save(out, str(tmp))


# ---------------------------------------------------------------- canvas slices


@dataclass
class CanvasGeometry:
    """Everything needed to map canvas slices back to the input array, exactly."""

    source_shape: tuple[int, int, int]  # file array order
    source_ornt: np.ndarray  # nibabel orientation of the file's axes (io_orientation of its affine)
    axis: int  # slicing axis in RAS array order
    plane_shape: tuple[int, int]  # in-plane shape before resampling
    resampled_shape: tuple[int, int]  # in-plane shape at the common pixel spacing
    offset: tuple[int, int]  # where the resampled slice's (0, 0) sits on the canvas (< 0: cropped)
    canvas: int
    pixel_spacing_mm: float = 0.0  # in-plane spacing: the preset's, for every volume
    slice_spacing_mm: float = 0.0  # spacing along the slicing axis (canvas slices are not resampled in z)
    # World (RAS) unit vectors of the canvas's (slice, row, column) axes: () when not known. Reorienting
    # to RAS snaps an oblique axis to its nearest cardinal one, so two scans cut alike (cardiac short
    # axis) can come out with their canvas slices in opposite orders; these say which way they truly run.
    directions: tuple[tuple[float, float, float], ...] = ()

    @property
    def spacing(self) -> tuple[float, float, float]:
        """mm between canvas voxels along (slice, row, column): what registration works in."""
        return (self.slice_spacing_mm, self.pixel_spacing_mm, self.pixel_spacing_mm)

    @property
    def to_ras(self) -> np.ndarray:
        return nio.ornt_transform(self.source_ornt, RAS)

    @property
    def from_ras(self) -> np.ndarray:
        return nio.ornt_transform(RAS, self.source_ornt)

    @property
    def file_axis(self) -> int:
        """The file's array axis the canvas slices are cut along."""
        return int(np.flatnonzero(self.source_ornt[:, 0] == self.axis)[0])

    def file_slice(self, z: int) -> int:
        """Canvas slice ``z`` (RAS order) -> index along :attr:`file_axis` of the file's own array."""
        if self.source_ornt[self.file_axis, 1] < 0:
            return int(self.source_shape[self.file_axis] - 1 - z)
        return int(z)


def choose_axis(spacing_ras: Sequence[float], setting: str | int) -> int:
    """``auto``: the axis with the coarsest spacing (the acquisition's slice direction);
    ties go to the last such axis (axial for isotropic CT)."""
    if setting == "auto":
        coarsest = max(spacing_ras)
        return max(i for i, s in enumerate(spacing_ras) if np.isclose(s, coarsest, rtol=0.05))
    axis = int(setting)
    if axis not in (0, 1, 2):
        raise VolumeError(f"slicing_axis must be auto, 0, 1 or 2, not {setting!r}")
    return axis


def normalise_intensity(array: np.ndarray, settings: IntensitySettings) -> np.ndarray:
    """-> float32 in [0, 1]. CT gets a window, MR a percentile clip (MR has no absolute scale)."""
    modality = settings.modality
    if modality == "auto":
        modality = "ct" if float(array.min()) < -500 else "mr"
    if modality == "ct":
        center, width = settings.window()
        lo, hi = center - width / 2, center + width / 2
    else:
        lo, hi = np.percentile(array, list(settings.mr_percentiles))
    if hi <= lo:  # a constant image: nothing to stretch
        return np.zeros_like(array, dtype=np.float32)
    return np.clip((array - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _resize(stack: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, *size); antialiased when shrinking so thin structures are not aliased away."""
    if tuple(stack.shape[-2:]) == tuple(size):
        return stack
    if mode == "nearest":
        return F.interpolate(stack, size=size, mode="nearest-exact")
    shrinking = size[0] < stack.shape[-2] or size[1] < stack.shape[-1]
    return F.interpolate(stack, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


def _place(stack: torch.Tensor, offset: tuple[int, int], canvas: int) -> torch.Tensor:
    """Put (N, C, h, w) at ``offset`` on an N x C x canvas x canvas zero canvas, cropping what falls outside."""
    n, c, h, w = stack.shape
    out = stack.new_zeros((n, c, canvas, canvas))
    oy, ox = offset
    y0, x0 = max(oy, 0), max(ox, 0)
    y1, x1 = min(oy + h, canvas), min(ox + w, canvas)
    out[:, :, y0:y1, x0:x1] = stack[:, :, y0 - oy : y1 - oy, x0 - ox : x1 - ox]
    return out


def _take(stack: torch.Tensor, offset: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``_place``: cut a region of ``shape`` at ``offset`` from the canvas (zeros where it was cropped)."""
    n, c, canvas, _ = stack.shape
    h, w = shape
    out = stack.new_zeros((n, c, h, w))
    oy, ox = offset
    y0, x0 = max(oy, 0), max(ox, 0)
    y1, x1 = min(oy + h, canvas), min(ox + w, canvas)
    out[:, :, y0 - oy : y1 - oy, x0 - ox : x1 - ox] = stack[:, :, y0:y1, x0:x1]
    return out


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Reorient (flips and axis permutations only, no interpolation) so axes run R, A, S.

    Returns the reoriented array, the file's own orientation and the spacing along R, A, S.
    """
    source = nio.io_orientation(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    spacing_ras = tuple(float(spacing[int(i)]) for i in np.argsort(source[:, 0]))
    return nio.apply_orientation(array, nio.ornt_transform(source, RAS)), source, spacing_ras


def canvas_directions(affine: np.ndarray, source_ornt: np.ndarray, axis: int) -> tuple[tuple[float, float, float], ...]:
    """World unit vectors of the canvas's (slice, row, column) axes: the RAS array's ``axis``, then
    its other two axes in order (as :func:`volume_to_canvas` cuts it), each the file axis it came
    from, flipped where reorienting flipped it."""
    ras_axes = {}
    for file_axis, (ras_axis, flip) in enumerate(np.asarray(source_ornt)):
        column = np.asarray(affine, np.float64)[:3, file_axis]
        ras_axes[int(ras_axis)] = column / np.linalg.norm(column) * flip
    order = [axis] + [k for k in range(3) if k != axis]
    return tuple(tuple(float(v) for v in ras_axes[k]) for k in order)


# Bumped when the same file and settings give other canvas slices; banks and embedding caches key on it.
# 2: one pixel spacing for every volume (version 1 gave a wide field of view a coarser spacing).
CANVAS_VERSION = 2
BODY_LEVEL = 0.1  # normalised intensity above which a pixel counts as body, not air, when placing the canvas


def _body_box(slices: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(first, last + 1) in-plane pixel of anything brighter than air over all slices, or None."""
    body = (slices > BODY_LEVEL).any(axis=0)
    if not body.any():
        return None
    rows, cols = np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))
    return np.array([rows[0], cols[0]]), np.array([rows[-1] + 1, cols[-1] + 1])


def _window_offset(slices: np.ndarray, plane_shape, resampled, canvas: int) -> tuple[int, int]:
    """Where the resampled slice's (0, 0) sits on the canvas: centred when it fits; otherwise the
    canvas window is centred on the body (negative offset: cropped), never beyond the image."""
    box = _body_box(slices)
    offset = []
    for axis, (n, r) in enumerate(zip(plane_shape, resampled)):
        if r <= canvas:
            offset.append((canvas - r) // 2)
            continue
        centre = (box[0][axis] + box[1][axis]) / 2 * r / n if box is not None else r / 2
        offset.append(int(np.clip(round(canvas / 2 - centre), canvas - r, 0)))
    return tuple(offset)


def _report_crop(path, slices, plane_shape, resampled, offset, canvas, spacing, extent) -> None:
    box = _body_box(slices)
    cut = 0.0
    if box is not None:
        for axis, (n, r) in enumerate(zip(plane_shape, resampled)):
            lo, hi = box[0][axis] * r / n, box[1][axis] * r / n  # body extent in resampled pixels
            cut = max(cut, (max(0.0, -offset[axis] - lo) + max(0.0, hi - (canvas - offset[axis]))) * spacing)
    if cut > spacing:
        logger.warning(
            "%s: the body is wider than the canvas (%d px x %.2f mm = %.0f mm): %.0f mm of it is cut off and "
            "cannot be segmented; set volume.canvas to at least %d to keep it whole (one canvas per bank)",
            path, canvas, spacing, canvas * spacing, cut, int(np.ceil(max(extent) / spacing / 32) * 32),
        )
    else:
        logger.info(
            "%s: in-plane field of view %.0f x %.0f mm is wider than the canvas (%.0f mm): cropped around the body, "
            "at the bank's %.2f mm spacing", path, extent[0], extent[1], canvas * spacing, spacing,
        )


def volume_to_canvas(volume: Volume, settings: VolumeSettings) -> tuple[np.ndarray, CanvasGeometry]:
    """Volume -> (Z, S, S) float32 canvas slices in [0, 1] and the geometry to come back."""
    ras, source_ornt, spacing_ras = to_ras(volume.array, volume.affine)
    axis = choose_axis(spacing_ras, settings.slicing_axis)
    plane_spacing = [s for i, s in enumerate(spacing_ras) if i != axis]
    slices = np.moveaxis(normalise_intensity(ras, settings.intensity), axis, 0)
    plane_shape = tuple(int(s) for s in slices.shape[1:])
    spacing, canvas = settings.pixel_spacing_mm, settings.canvas
    extent = [n * sp for n, sp in zip(plane_shape, plane_spacing)]
    # Every volume is resampled at the same spacing, whatever its field of view: one physical scale
    # per bank, so an organ has the same size in pixels in a support and in a query (retrieval,
    # matching and SAM 2's memory attention all compare pixels). A field of view wider than the
    # canvas is cropped around the body; a body wider than the canvas is cut, and said so.
    # Judged in whole pixels: a 256 x 1.25 mm slice on a 256 px, 1.25 mm canvas fits even when
    # float32 affines make its extent 320.00003 mm.
    resampled = tuple(max(1, int(round(e / spacing))) for e in extent)
    offset = _window_offset(slices, plane_shape, resampled, canvas)
    if max(resampled) > canvas:
        _report_crop(volume.path, slices, plane_shape, resampled, offset, canvas, spacing, extent)
    geometry = CanvasGeometry(
        source_shape=volume.shape, source_ornt=source_ornt, axis=axis, plane_shape=plane_shape,
        resampled_shape=resampled, offset=offset, canvas=canvas, pixel_spacing_mm=spacing,
        slice_spacing_mm=float(spacing_ras[axis]), directions=canvas_directions(volume.affine, source_ornt, axis),
    )
    stack = torch.from_numpy(np.ascontiguousarray(slices))[:, None]
    stack = _place(_resize(stack, resampled, "bilinear"), offset, canvas)
    return stack[:, 0].clamp_(0, 1).numpy(), geometry


def label_to_canvas(label: np.ndarray, geometry: CanvasGeometry) -> np.ndarray:
    """Label in file array order -> (Z, S, S) uint16 canvas masks (nearest neighbour: values stay exact)."""
    ras = nio.apply_orientation(label, geometry.to_ras)
    slices = np.moveaxis(ras, geometry.axis, 0).astype(np.int32)
    stack = torch.from_numpy(np.ascontiguousarray(slices))[:, None].float()
    stack = _place(_resize(stack, geometry.resampled_shape, "nearest"), geometry.offset, geometry.canvas)
    return stack[:, 0].round().numpy().astype(np.uint16)


def canvas_to_label(
    probabilities: np.ndarray, labels: Sequence[int], geometry: CanvasGeometry,
    decision: LabelDecision = LabelDecision(),
) -> np.ndarray:
    """(Z, L, S, S) per-label probabilities -> label volume in the input's array order.

    Probabilities are resampled (bilinear) to the native grid before the decision, so edges are
    placed at native resolution rather than as blocky upsampled canvas pixels. Each voxel then takes
    the label ``decision`` gives it (by default the most probable label where it exceeds 0.5).
    """
    z, n_labels = probabilities.shape[:2]
    out = np.zeros((z,) + geometry.plane_shape, dtype=np.uint16)
    if n_labels:
        lut = np.asarray([0] + [int(v) for v in labels], dtype=np.uint16)
        # Chunks over z bound memory for large volumes with many labels.
        for start in range(0, z, 16):
            stack = torch.from_numpy(np.ascontiguousarray(probabilities[start : start + 16], dtype=np.float32))
            native = _resize(_take(stack, geometry.offset, geometry.resampled_shape), geometry.plane_shape, "bilinear")
            choice = decision.decide(np.moveaxis(native.numpy(), 1, 0)) + 1
            out[start : start + 16] = lut[choice]
    result = nio.apply_orientation(np.moveaxis(out, 0, geometry.axis), geometry.from_ras)
    assert result.shape == geometry.source_shape, (result.shape, geometry.source_shape)
    return np.ascontiguousarray(result)
