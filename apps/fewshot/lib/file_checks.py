"""What an uploaded volume file holds besides what its header promises, checked before its voxels
are read (``lib.validation`` answers each refusal with a 422).

* **Two geometries.** A NIfTI header has an sform and a qform. nibabel and MONAI place the voxels
  by the sform, ITK (3D Slicer) by the qform: when both are set they must agree, or one file lands
  in two places (a label on its image here, 40 mm off it in Slicer).
* **Data after the voxels.** Readers stop where the header's voxels end, so anything after them (a
  gzip stream followed by 1 GB of zeros) would be stored byte for byte. It is refused rather than
  cut off by rewriting the file: a stored label stays byte for byte what the client sent (the
  bank's manifest records its checksum) and a save costs no re-encoding.
* **Decompression bombs.** The header's voxel count is checked first, against the image's (labels)
  or a budget (images and /infer uploads: voxels, and bytes of voxel data, ``-c max_volume_mb``);
  compressed data is then decoded in bounded pieces, never beyond the size the header announces
  plus one byte (to notice more), and only labels keep what is decoded. A 2.5 MB ``.nii.gz`` whose
  header announces 2.5 GB is refused from its header, before a byte of it is decompressed.
"""
from __future__ import annotations

import bz2
import os
import zlib
from typing import BinaryIO

import nibabel as nib
import numpy as np
from nibabel.volumeutils import apply_read_scaling

from fewshot.volume import AFFINE_ATOL, AFFINE_RTOL, VolumeError

# 1024^3 voxels: above any clinical series (512 x 512 x 2000 is half of it); the engine holds a
# volume as float32, so this is already 4 GB of memory.
MAX_VOXELS = 2**30
# NIfTI header plus extensions, before the voxels: real extensions (DICOM, JSON sidecars) are kB.
MAX_HEADER_BYTES = 16 << 20
CHUNK = 1 << 20
# What may follow the last data member of a multi-member gzip: empty members (bgzip ends with a
# 28-byte one).
GZIP_TAIL_BYTES = 64
COMPRESSED_NRRD = {"gzip": "gzip", "gz": "gzip", "bzip2": "bz2", "bz2": "bz2"}


class TooLarge(VolumeError):
    """The file announces more voxel data than the server's budget (413, not 422: the file may be fine)."""


# ------------------------------------------------------------------ geometry


def disagreeing_geometry(header: nib.Nifti1Header) -> str | None:
    """Why a NIfTI header's sform and qform place its voxels differently; None when they agree or
    only one of them is set."""
    qform, _ = header.get_qform(coded=True)
    sform, _ = header.get_sform(coded=True)
    if qform is None or sform is None or np.allclose(qform, sform, atol=AFFINE_ATOL, rtol=AFFINE_RTOL):
        return None
    dims = [max(int(s), 1) for s in header.get_data_shape()[:3]]
    dims += [1] * (3 - len(dims))
    corners = np.array([[x, y, z, 1.0] for x in (0, dims[0] - 1) for y in (0, dims[1] - 1) for z in (0, dims[2] - 1)]).T
    apart = float(np.linalg.norm(((sform - qform) @ corners)[:3], axis=0).max())
    return (
        f"its two geometry headers disagree: the sform and the qform place its voxels up to {apart:.1f} mm apart. "
        "3D Slicer (ITK) places a NIfTI file by its qform, MONAI and nibabel by its sform, so it would not show "
        "where it is used; save it with one geometry (qform equal to sform)"
    )


# ------------------------------------------------------------------ sizes and trailing data


def check_before_reading(path: str, nifti: nib.Nifti1Image | None, what: str, max_voxels: int, limit: str,
                         max_bytes: int | None = None) -> None:
    """Voxel count within ``max_voxels`` (``limit`` says whose) and voxel data within ``max_bytes``
    (``TooLarge`` otherwise), both from the header, then the file ends with its voxels, without
    keeping what is decoded. ``nifti``: the file loaded by nibabel (header only), None for NRRD."""
    if nifti is not None:
        proxy = nifti.dataobj
        _check_voxels(int(np.prod(proxy.shape, dtype=np.int64)), proxy.dtype.itemsize, max_voxels, max_bytes, what, limit)
        nifti_bytes(path, nifti, what, keep=False)
    else:
        check_nrrd(path, what, max_voxels, limit, max_bytes)


def _check_voxels(count: int, itemsize: int, max_voxels: int, max_bytes: int | None, what: str, limit: str) -> None:
    if max_bytes is not None and count * itemsize > max_bytes:
        raise TooLarge(
            f"{what}: its header announces {count} voxels, {count * itemsize / 2**20:.0f} MB of voxel data once "
            f"decompressed, more than this server accepts ({max_bytes / 2**20:.0f} MB, -c max_volume_mb); "
            "nothing was decompressed"
        )
    if count > max_voxels:
        # Over a budget (an image): 413. Over its image's voxels (a label): it does not fit, 422.
        kind = TooLarge if max_bytes is not None else VolumeError
        raise kind(f"{what}: its header announces {count} voxels, more than {limit} ({max_voxels})")


def nifti_bytes(path: str, nifti: nib.Nifti1Image, what: str, keep: bool) -> bytearray | None:
    """Checks a NIfTI file ends where its voxels end. For ``.nii.gz`` with ``keep``, returns the
    decompressed file (header and voxels: read them with ``nifti_voxels``); otherwise None."""
    proxy = nifti.dataobj  # where nibabel reads the voxels: offset, dtype, shape, scaling
    if proxy.offset > MAX_HEADER_BYTES:
        raise VolumeError(f"{what}: its header puts the voxels {proxy.offset} bytes into the file; a NIfTI header is far smaller")
    size = int(proxy.offset) + int(np.prod(proxy.shape, dtype=np.int64)) * proxy.dtype.itemsize
    if path.lower().endswith(".gz"):
        with open(path, "rb") as f:
            return inflate_exactly(f, "gzip", size, what, keep=keep, multi_member=True)
    actual = os.path.getsize(path)
    if actual > size:
        raise VolumeError(f"{what}: {actual - size} bytes follow its voxel data; a NIfTI file ends with its voxels")
    if actual < size:
        raise VolumeError(f"{what}: the file is cut short ({actual} of the {size} bytes its header announces)")
    return None


def nifti_voxels(data: bytearray, nifti: nib.Nifti1Image) -> np.ndarray:
    """The voxels of a decompressed NIfTI file, as nibabel reads them (its dtype, axis order and
    scaling), without copying them."""
    proxy = nifti.dataobj
    raw = np.frombuffer(data, dtype=proxy.dtype, count=int(np.prod(proxy.shape, dtype=np.int64)), offset=int(proxy.offset))
    return apply_read_scaling(raw.reshape(proxy.shape, order=proxy.order), proxy.slope, proxy.inter)


def check_nrrd(path: str, what: str, max_voxels: int, limit: str, max_bytes: int | None = None) -> None:
    """An NRRD upload's header: its own data (no detached data file: it would name another file on
    the server), at most ``max_voxels``; compressed data must decode to exactly its voxels (pynrrd
    decodes a gzip or bzip2 stream whole, however large). Raw data of another size is refused by
    pynrrd itself."""
    import nrrd
    from nrrd.reader import _determine_datatype

    with open(path, "rb") as f:
        try:
            header = nrrd.read_header(f)
            dtype = _determine_datatype(header)
        except Exception as exc:
            raise VolumeError(f"{what}: not a readable NRRD file ({type(exc).__name__}: {exc})") from None
        if "data file" in header or "datafile" in header:
            raise VolumeError(f"{what}: its voxels are in a separate data file; upload an NRRD that holds its voxels (.nrrd, not .nhdr)")
        count = int(np.prod([int(s) for s in header["sizes"]], dtype=np.int64))
        _check_voxels(count, dtype.itemsize, max_voxels, max_bytes, what, limit)
        kind = COMPRESSED_NRRD.get(str(header.get("encoding", "raw")).lower())
        if kind is None:
            return
        for _ in range(int(header.get("line skip", header.get("lineskip", 0)))):
            f.readline()
        skip = int(header.get("byte skip", header.get("byteskip", 0)))
        if skip < 0:
            raise VolumeError(f"{what}: 'byte skip: -1' with {header['encoding']} data is not accepted; save it uncompressed or without byte skip")
        inflate_exactly(f, kind, skip + count * dtype.itemsize, what, keep=False, multi_member=False)


def inflate_exactly(f: BinaryIO, kind: str, size: int, what: str, keep: bool, multi_member: bool) -> bytearray | None:
    """Decodes the compressed data from ``f``'s position: it must decode to exactly ``size`` bytes and
    end the file. Never decodes more than ``size + 1`` bytes, whatever the data holds. ``kind``:
    gzip or bz2; ``multi_member``: further gzip members continue the data (nibabel reads them, as
    bgzip writes them; pynrrd reads one). Returns the bytes with ``keep``."""
    out, produced, members = bytearray(size) if keep else None, 0, 1
    max_members = size // 1024 + 16  # bgzip's members hold up to 64 kB each
    d, data = _decompressor(kind), b""
    try:
        while True:
            if not data and _wants_input(d, kind):
                data = f.read(CHUNK)
                if not data:
                    raise VolumeError(f"{what}: its compressed data is cut short ({produced} of the {size} bytes its header announces, "
                                      "or no end-of-stream marker)")
            piece = d.decompress(data, size + 1 - produced)
            if produced + len(piece) > size:
                raise VolumeError(f"{what}: its compressed data holds more than the {size} bytes its header announces")
            if keep:
                out[produced:produced + len(piece)] = piece
            produced += len(piece)
            if d.eof:
                data = d.unused_data
                if produced == size:
                    _check_end(f, data, what, multi_member)
                    return out
                members += 1
                if not multi_member or members > max_members:
                    raise VolumeError(f"{what}: its compressed data ends early ({produced} of the {size} bytes its header announces)")
                d = _decompressor(kind)
            else:
                data = d.unconsumed_tail if kind == "gzip" else b""
    except (zlib.error, OSError, EOFError) as exc:
        raise VolumeError(f"{what}: its compressed data is corrupt ({exc})") from None


def _decompressor(kind: str):
    return zlib.decompressobj(zlib.MAX_WBITS | 16) if kind == "gzip" else bz2.BZ2Decompressor()


def _wants_input(d, kind: str) -> bool:
    # zlib hands back unread input (unconsumed_tail, fed again by the caller); bz2 keeps it inside.
    return True if kind == "gzip" else d.needs_input


def _check_end(f: BinaryIO, rest: bytes, what: str, multi_member: bool) -> None:
    """After the last voxel's compressed member: the end of the file, or (gzip read by nibabel)
    a few bytes of empty members."""
    after = rest + f.read(GZIP_TAIL_BYTES + 1 - len(rest)) if len(rest) <= GZIP_TAIL_BYTES else rest
    if not after:
        return
    if multi_member and len(after) <= GZIP_TAIL_BYTES and _empty_members(after):
        return
    total = os.fstat(f.fileno()).st_size - (f.tell() - len(after))
    raise VolumeError(f"{what}: {total} bytes follow the end of its compressed voxel data; a file must end with its voxels")


def _empty_members(data: bytes) -> bool:
    while data:
        d = zlib.decompressobj(zlib.MAX_WBITS | 16)
        try:
            if d.decompress(data, 1) or not d.eof:
                return False
        except zlib.error:
            return False
        data = d.unused_data
    return True
