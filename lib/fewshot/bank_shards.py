"""One image's entries in a SupportBank, in memory and on disk: the ``SliceBatch`` the engine hands
the bank, the shard directory it becomes (written under a temporary name, fsynced, hashed, renamed:
``write_shard``), its check against the manifest (``check_shard``), and the read-only views the bank
searches (``Shard``, memory-mapped; ``MemoryShard`` for a bank without a directory). The manifest,
locking and sharing between processes are ``fewshot.bank``'s.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from fewshot.files import file_sha256, fsync_dir
from fewshot.types import Atlas

ARRAYS = ("images", "masks", "embeddings", "slice_index")


class BankError(RuntimeError):
    pass


@dataclass
class SliceBatch:
    """All bank entries of one image: each row is a (possibly augmented) canvas slice."""

    images: np.ndarray  # (E, S, S) float in [0, 1]; stored as float16
    masks: np.ndarray  # (E, S, S) uint16 label maps
    embeddings: np.ndarray  # (E, D) float32
    slice_index: np.ndarray  # (E,) int: slice of the source volume, along its file's own slicing axis
    augmentation: list[str]  # (E,) "" for original slices
    # The transfer step's cached arrays, each (E, L, ...): axis 1 runs over ``payload_labels``.
    payload: dict[str, np.ndarray] = field(default_factory=dict)
    payload_labels: tuple[int, ...] = ()
    # The whole labelled scan, for transfers that register scans rather than slices (multi-atlas).
    atlas: Atlas | None = None

    def __post_init__(self):
        n = len(self.images)
        for name in ("masks", "embeddings", "slice_index"):
            if len(getattr(self, name)) != n:
                raise BankError(f"slice batch: {name} has {len(getattr(self, name))} rows, images has {n}")
        if len(self.augmentation) != n:
            raise BankError("slice batch: augmentation descriptions do not match the number of rows")
        for name, arr in self.payload.items():
            if len(arr) != n:
                raise BankError(f"slice batch: payload {name} has {len(arr)} rows, images has {n}")



def safe_name(image_id: str) -> str:
    """A directory name for any image id: readable prefix plus a hash, so ids never escape the bank."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)[:48].strip("._") or "image"
    return f"{stem}-{hashlib.sha1(image_id.encode()).hexdigest()[:10]}"


def labels_per_entry(masks: np.ndarray) -> list[tuple[int, ...]]:
    """Label values present in each mask, computed once when entries are written."""
    return [tuple(int(v) for v in np.unique(m) if v) for m in masks]


MAX_OPEN_MAPPINGS = 512  # memory mappings a process keeps open (each holds a file descriptor)


class _OpenMappings:
    """The process's open memory mappings of shard files, most recently used kept.

    A mapping holds a file descriptor for as long as it lives (CPython's mmap keeps a duplicate),
    and a shard has up to eight files. Mapped all at once, a bank of a few thousand scans ran out of
    descriptors ("Too many open files" at 2,496 shards under a limit of 20,000; many machines allow
    1,024). So files are mapped when read and only the most recently used stay mapped; a dropped one
    is mapped again on its next read (its pages are then usually still in the page cache). Shard
    directories are new with every write, so a path always names the same bytes."""

    def __init__(self, limit: int):
        self.limit = limit
        self._items: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> np.ndarray:
        with self._lock:
            if path in self._items:
                self._items.move_to_end(path)
                return self._items[path]
        array = np.load(path, mmap_mode="r")
        with self._lock:
            self._items[path] = array
            while len(self._items) > self.limit:
                self._items.popitem(last=False)
        return array

    def __len__(self) -> int:
        return len(self._items)


_MAPPINGS = _OpenMappings(MAX_OPEN_MAPPINGS)


class _MappedArrays(Mapping):
    """name -> the shard's array, mapped on access through ``_MAPPINGS``."""

    def __init__(self, paths: Mapping[str, Path]):
        self._paths = dict(paths)

    def __getitem__(self, name: str) -> np.ndarray:
        return _MAPPINGS.get(self._paths[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


def _npy_shape(path: Path) -> tuple[int, ...]:
    """An .npy file's array shape, from its header alone (no mapping, no descriptor kept)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return tuple(read(f)[0])


class Shard:
    """One image's entries, memory-mapped read-only from its shard directory when read."""

    def __init__(self, directory: Path, record: Mapping):
        self.directory = directory
        self.token = directory.name  # unique per write (uuid-suffixed): an entry's identity is token/index
        self.arrays = _MappedArrays({name: directory / f"{name}.npy" for name in ARRAYS})
        self.payload = _MappedArrays({name: directory / f"payload.{name}.npy" for name in record.get("payload", [])})
        meta = json.loads((directory / "meta.json").read_text())
        self._rows = _npy_shape(directory / "images.npy")[0]
        self.augmentation: list[str] = meta["augmentation"]
        self.entry_labels: list[tuple[int, ...]] = [tuple(int(v) for v in e) for e in meta["labels"]]
        if len(self.entry_labels) != len(self) or len(self.augmentation) != len(self):
            raise ValueError("meta.json does not describe every entry")
        self._atlas: dict | None = None
        if record.get("atlas"):
            info = record["atlas"]
            shape = _npy_shape(directory / "atlas.image.npy")
            if shape != _npy_shape(directory / "atlas.mask.npy") or len(shape) != 3:
                raise ValueError("atlas image and mask shapes differ")
            self._atlas = dict(
                image_id=str(meta["image_id"]),
                spacing=tuple(float(v) for v in info["spacing"]),
                components={int(k): int(v) for k, v in info["components"].items()},
                key=str(info["key"]),
                axis=int(info.get("axis", -1)),
                directions=tuple(tuple(float(v) for v in d) for d in info.get("directions", ())),
            )

    @property
    def atlas(self) -> Atlas | None:
        """The labelled scan as a multi-atlas transfer uses it, its volumes mapped when asked for."""
        if self._atlas is None:
            return None
        return Atlas(image=_MAPPINGS.get(self.directory / "atlas.image.npy"),
                     mask=_MAPPINGS.get(self.directory / "atlas.mask.npy"), **self._atlas)

    def read(self, name: str) -> np.ndarray:
        """A whole array read into memory, not through the mapping: pages read through a mapping stay
        resident in this process while the shard is open, so an index build (every vector once)
        would keep the bank's embeddings resident for good; read, they are freed after the build."""
        return np.load(self.directory / f"{name}.npy")

    def __len__(self) -> int:
        return self._rows


class MemoryShard:
    """The same view over a SliceBatch kept in memory (a bank without a directory)."""

    def __init__(self, batch: SliceBatch, entry_labels: list[tuple[int, ...]]):
        self.arrays = {name: getattr(batch, name) for name in ARRAYS}
        self.token = uuid.uuid4().hex  # as a shard directory's name: new with every write
        self.payload = batch.payload
        self.augmentation = list(batch.augmentation)
        self.entry_labels = entry_labels
        self.atlas = batch.atlas

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self.arrays[name])

    def __len__(self) -> int:
        return len(self.arrays["images"])



def check_shard(shards: Path, record: Mapping, verify: str) -> str:
    """Why the shard ``record`` names cannot be used as the manifest describes it ("" when it can):
    missing, truncated, or (``verify`` "sha256") altered."""
    shard = shards / str(record.get("shard", ""))
    if not record.get("shard") or not shard.is_dir():
        return "shard directory missing"
    for name, expected in record.get("files", {}).items():
        path = shard / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} truncated or altered (size {path.stat().st_size}, expected {expected['size']})"
        if verify == "sha256" and file_sha256(path) != expected["sha256"]:
            return f"{name} checksum mismatch"
    return ""



def write_shard(shards: Path, image_id: str, batch: SliceBatch, entry_labels: list[tuple[int, ...]]) -> tuple[str, dict]:
    """Write one image's entries as a new shard directory under ``shards``: built under a temporary
    name, every file fsynced and hashed, then renamed. Returns (its name, its files' sizes and sha256)
    for the manifest, which commits it."""
    shards.mkdir(parents=True, exist_ok=True)
    tmp = shards / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    arrays = {
        "images": np.asarray(batch.images, dtype=np.float16),
        "masks": np.asarray(batch.masks, dtype=np.uint16),
        "embeddings": np.asarray(batch.embeddings, dtype=np.float32),
        "slice_index": np.asarray(batch.slice_index, dtype=np.int32),
    }
    arrays.update({f"payload.{k}": np.asarray(v) for k, v in batch.payload.items()})
    if batch.atlas is not None:
        arrays["atlas.image"] = np.asarray(batch.atlas.image, dtype=np.float16)
        arrays["atlas.mask"] = np.asarray(batch.atlas.mask, dtype=np.uint16)
    try:
        files = {}
        for name, arr in arrays.items():
            path = tmp / f"{name}.npy"
            with open(path, "wb") as f:
                np.save(f, np.ascontiguousarray(arr))
                f.flush()
                os.fsync(f.fileno())
            files[path.name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
        meta = tmp / "meta.json"
        meta.write_text(json.dumps({
            "image_id": image_id, "augmentation": list(batch.augmentation), "labels": [list(e) for e in entry_labels],
        }))
        files["meta.json"] = {"size": meta.stat().st_size, "sha256": file_sha256(meta)}
        fsync_dir(tmp)
        name = f"{safe_name(image_id)}-{uuid.uuid4().hex[:8]}"
        os.rename(tmp, shards / name)
        fsync_dir(shards)
        return name, files
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

