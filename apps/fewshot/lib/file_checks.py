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
  compressed data is then decoded in pieces of at most ``PIECE`` bytes, never beyond the size the
  header announces plus one byte (to notice more), and only labels keep what is decoded. A 2.5 MB
  ``.nii.gz`` whose header announces 2.5 GB is refused from its header, before a byte of it is
  decompressed.
* **Images checked as they stream.** An image upload's voxels are checked for NaN and infinity
  piece by piece as they are decoded (``VoxelCheck``), so storing an image of the budget's size
  costs a few MB of memory, not the float32 volume the engine reads (a 512 MiB image took the
  server from 1.1 to 4.2 GB).
"""
from __future__ import annotations

import bz2
import os
import zlib
from typing import BinaryIO, Callable

import nibabel as nib
import numpy as np
from nibabel.volumeutils import apply_read_scaling

from fewshot.volume import AFFINE_ATOL, AFFINE_RTOL, VolumeError
# NIfTI header plus extensions, before the voxels: real extensions (DICOM, JSON sidecars) are kB.
MAX_HEADER_BYTES = 16 << 20
CHUNK = 1 << 20  # compressed bytes read at a time
PIECE = 4 << 20  # decoded bytes produced at a time (1 MB of zeros decodes to 1 GB)
# What the engine reads voxels into: scaled values beyond it would become infinite.
FLOAT32_MAX = float(np.finfo(np.float32).max)
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


Sink = Callable[[bytes], None]  # receives the decoded file, piece by piece, in order


class VoxelCheck:
    """Checks voxel data as it is decoded, without keeping it: no NaN or infinity, and (with read
    scaling) no value the engine's float32 cannot hold. Fed the decoded file from its first byte;
    ``start``: where the voxels begin."""

    def __init__(self, dtype: np.dtype, start: int, what: str, slope: float = 1.0, inter: float = 0.0):
        self.dtype, self.start, self.what = np.dtype(dtype), int(start), what
        self.slope, self.inter = float(slope), float(inter)
        self.seen, self.carry = 0, b""

    def __call__(self, piece: bytes) -> None:
        skip = max(0, self.start - self.seen)
        self.seen += len(piece)
        if skip >= len(piece):
            return
        data = self.carry + bytes(memoryview(piece)[skip:]) if self.carry or skip else piece
        whole = len(data) // self.dtype.itemsize * self.dtype.itemsize
        self.carry = bytes(memoryview(data)[whole:])
        values = np.frombuffer(data, dtype=self.dtype, count=whole // self.dtype.itemsize)
        if not values.size:
            return
        if self.dtype.kind == "f" and not np.isfinite(values).all():
            raise VolumeError(f"{self.what}: the image holds NaN or infinite values")
        if self.slope != 1.0 or self.inter != 0.0 or self.dtype.itemsize > 4:
            top = float(np.abs(values).max()) * abs(self.slope) + abs(self.inter)
            if not top <= FLOAT32_MAX:
                raise VolumeError(f"{self.what}: the image holds values beyond float32's range once scaled")


def check_before_reading(path: str, nifti: nib.Nifti1Image | None, what: str, max_voxels: int, limit: str,
                         max_bytes: int | None = None, voxels: bool = False) -> bool:
    """Voxel count within ``max_voxels`` (``limit`` says whose) and voxel data within ``max_bytes``
    (``TooLarge`` otherwise), both from the header, then the file ends with its voxels, without
    keeping what is decoded. ``nifti``: the file loaded by nibabel (header only), None for NRRD.
    With ``voxels``, the voxel values are checked as they stream past too (``VoxelCheck``); returns
    whether they were (False for an NRRD encoding this module does not decode: text or hex)."""
    if nifti is None:
        return check_nrrd(path, what, max_voxels, limit, max_bytes, voxels)
    proxy = nifti.dataobj
    _check_voxels(int(np.prod(proxy.shape, dtype=np.int64)), proxy.dtype.itemsize, max_voxels, max_bytes, what, limit)
    sink = None
    if voxels:
        slope, inter = _scaling(proxy)
        sink = VoxelCheck(proxy.dtype, proxy.offset, what, slope, inter)
    nifti_bytes(path, nifti, what, keep=False, sink=sink)
    return voxels


def _scaling(proxy) -> tuple[float, float]:
    """The read scaling nibabel applies (none when the header's slope is unset, 0 or not finite)."""
    slope = 1.0 if proxy.slope is None or not np.isfinite(proxy.slope) or proxy.slope == 0 else float(proxy.slope)
    inter = 0.0 if proxy.inter is None or not np.isfinite(proxy.inter) else float(proxy.inter)
    return slope, inter


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


def nifti_bytes(path: str, nifti: nib.Nifti1Image, what: str, keep: bool, sink: Sink | None = None) -> bytearray | None:
    """Checks a NIfTI file ends where its voxels end. For ``.nii.gz`` with ``keep``, returns the
    decompressed file (header and voxels: read them with ``nifti_voxels``); otherwise None.
    ``sink``: fed the (decompressed) file piece by piece."""
    proxy = nifti.dataobj  # where nibabel reads the voxels: offset, dtype, shape, scaling
    if proxy.offset > MAX_HEADER_BYTES:
        raise VolumeError(f"{what}: its header puts the voxels {proxy.offset} bytes into the file; a NIfTI header is far smaller")
    size = int(proxy.offset) + int(np.prod(proxy.shape, dtype=np.int64)) * proxy.dtype.itemsize
    if path.lower().endswith(".gz"):
        with open(path, "rb") as f:
            return inflate_exactly(f, "gzip", size, what, keep=keep, multi_member=True, sink=sink)
    actual = os.path.getsize(path)
    if actual > size:
        raise VolumeError(f"{what}: {actual - size} bytes follow its voxel data; a NIfTI file ends with its voxels")
    if actual < size:
        raise VolumeError(f"{what}: the file is cut short ({actual} of the {size} bytes its header announces)")
    if sink is not None:
        with open(path, "rb") as f:
            _stream(f, sink)
    return None


def _stream(f: BinaryIO, sink: Sink) -> None:
    while piece := f.read(PIECE):
        sink(piece)


def nifti_voxels(data: bytearray, nifti: nib.Nifti1Image) -> np.ndarray:
    """The voxels of a decompressed NIfTI file, as nibabel reads them (its dtype, axis order and
    scaling), without copying them."""
    proxy = nifti.dataobj
    raw = np.frombuffer(data, dtype=proxy.dtype, count=int(np.prod(proxy.shape, dtype=np.int64)), offset=int(proxy.offset))
    return apply_read_scaling(raw.reshape(proxy.shape, order=proxy.order), proxy.slope, proxy.inter)


def check_nrrd(path: str, what: str, max_voxels: int, limit: str, max_bytes: int | None = None, voxels: bool = False) -> bool:
    """An NRRD upload's header: its own data (no detached data file: it would name another file on
    the server), at most ``max_voxels``; compressed data must decode to exactly its voxels (pynrrd
    decodes a gzip or bzip2 stream whole, however large). Raw data of another size is refused by
    pynrrd itself. ``voxels``: as for ``check_before_reading`` (raw, gzip and bzip2 encodings)."""
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
        encoding = str(header.get("encoding", "raw")).lower()
        kind = COMPRESSED_NRRD.get(encoding)
        streamed = voxels and (kind is not None or encoding == "raw")
        if kind is None and not streamed:
            return False
        for _ in range(int(header.get("line skip", header.get("lineskip", 0)))):
            f.readline()
        skip = int(header.get("byte skip", header.get("byteskip", 0)))
        if skip < 0:
            if kind is not None:
                raise VolumeError(f"{what}: 'byte skip: -1' with {header['encoding']} data is not accepted; save it uncompressed or without byte skip")
            f.seek(-count * dtype.itemsize, os.SEEK_END)  # raw data with byte skip -1: the file's last bytes
            skip = 0
        sink = VoxelCheck(dtype, skip, what) if streamed else None
        if kind is not None:
            inflate_exactly(f, kind, skip + count * dtype.itemsize, what, keep=False, multi_member=False, sink=sink)
        else:
            _stream(f, sink)
        return streamed


def inflate_exactly(f: BinaryIO, kind: str, size: int, what: str, keep: bool, multi_member: bool,
                    sink: Sink | None = None) -> bytearray | None:
    """Decodes the compressed data from ``f``'s position: it must decode to exactly ``size`` bytes and
    end the file. Never decodes more than ``size + 1`` bytes, whatever the data holds, nor more than
    ``PIECE`` bytes at a time. ``kind``: gzip or bz2; ``multi_member``: further gzip members continue
    the data (nibabel reads them, as bgzip writes them; pynrrd reads one). Returns the bytes with
    ``keep``; ``sink`` is fed them piece by piece."""
    out, produced, members = bytearray(size) if keep else None, 0, 1
    max_members = size // 1024 + 16  # bgzip's members hold up to 64 kB each
    d, data = _decompressor(kind), b""
    try:
        while True:
            piece = d.decompress(data, min(PIECE, size + 1 - produced))
            data = d.unconsumed_tail if kind == "gzip" else b""  # bz2 keeps unread input inside
            if produced + len(piece) > size:
                raise VolumeError(f"{what}: its compressed data holds more than the {size} bytes its header announces")
            if keep:
                out[produced:produced + len(piece)] = piece
            if sink is not None and piece:
                sink(piece)
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
            elif not piece and not data:
                # Nothing came out with room to spare: the decompressor holds no more output (with
                # output capped at PIECE it may hold more than its input shows), so read on.
                data = f.read(CHUNK)
                if not data:
                    raise VolumeError(f"{what}: its compressed data is cut short ({produced} of the {size} bytes its header announces, "
                                      "or no end-of-stream marker)")
    except (zlib.error, OSError, EOFError) as exc:
        raise VolumeError(f"{what}: its compressed data is corrupt ({exc})") from None


def _decompressor(kind: str):
    return zlib.decompressobj(zlib.MAX_WBITS | 16) if kind == "gzip" else bz2.BZ2Decompressor()


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
