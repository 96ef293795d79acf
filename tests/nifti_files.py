"""Hostile NIfTI files for the tests: headers that promise more than a server should read."""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np


def nifti_bomb(path: Path, shape, affine=None, dtype=np.uint8) -> Path:
    """A .nii.gz whose header announces ``shape`` voxels of zeros: the header as one gzip member,
    then 64 MiB members of zeros (gzip readers, nibabel's included, read members as one stream).
    1400 x 1400 x 1300 uint8 is 2.5 MB on disk, 2.55 GB decompressed."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    affine = np.eye(4) if affine is None else affine
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    header["vox_offset"] = 352
    left = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    chunk = 64 << 20
    full = gzip.compress(b"\0" * chunk, compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(header.binaryblock + b"\0" * 4))
        while left >= chunk:
            f.write(full)
            left -= chunk
        if left:
            f.write(gzip.compress(b"\0" * left, compresslevel=9))
    return path
