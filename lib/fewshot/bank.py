"""SupportBank: labelled 2D slices, their embeddings in a faiss index, and cached transfer payloads.

On disk (one directory)::

    manifest.json              format version, fingerprint, one record per image id (files + sha256)
    shards/<id>-<generation>/  one directory per image id: images.npy, masks.npy, embeddings.npy,
                               slice_index.npy, payload.<name>.npy, meta.json

Every write goes to a temporary directory first and is renamed into place; the manifest is
replaced last (write, fsync, rename). A crash therefore leaves either the old or the new shard
referenced, never a torn one. On load every file is checked against the manifest; an image whose
shard is missing, truncated or altered is dropped and reported, so the caller can rebuild it from
its source label (the datastore's final labels are the truth, the bank is a cache).

The bank knows nothing of the networks: embeddings are vectors, payloads are named arrays.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import faiss
import numpy as np

from fewshot.types import Support, SupportRef

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_ARRAYS = ("images", "masks", "embeddings", "slice_index")


class BankError(RuntimeError):
    pass


@dataclass
class SliceBatch:
    """All bank entries of one image: each row is a (possibly augmented) canvas slice."""

    images: np.ndarray  # (E, S, S) float in [0, 1]; stored as float16
    masks: np.ndarray  # (E, S, S) uint16 label maps
    embeddings: np.ndarray  # (E, D) float32
    slice_index: np.ndarray  # (E,) int: slice of the source volume
    augmentation: list[str]  # (E,) "" for original slices
    # The transfer step's cached arrays, each (E, L, ...): axis 1 runs over ``payload_labels``.
    payload: dict[str, np.ndarray] = field(default_factory=dict)
    payload_labels: tuple[int, ...] = ()

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


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # image id -> why (to rebuild from its label)
    discarded_all: str = ""  # non-empty when the whole bank was unusable (version or fingerprint)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _safe_name(image_id: str) -> str:
    """A directory name for any image id: readable prefix plus a hash, so ids never escape the bank."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)[:48].strip("._") or "image"
    return f"{stem}-{hashlib.sha1(image_id.encode()).hexdigest()[:10]}"


class _Shard:
    """One image's entries, memory-mapped read-only from its shard directory."""

    def __init__(self, directory: Path, record: Mapping):
        self.directory = directory
        self.record = record
        self.arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
        self.payload = {
            name: np.load(directory / f"payload.{name}.npy", mmap_mode="r") for name in record.get("payload", [])
        }
        self.augmentation: list[str] = json.loads((directory / "meta.json").read_text())["augmentation"]
        self.labels_per_entry = [
            tuple(int(v) for v in np.unique(m) if v) for m in self.arrays["masks"]
        ]

    def __len__(self) -> int:
        return len(self.arrays["images"])


def build_index(
    data: np.ndarray,
    index_transform: str = "",
    approximate_above: int = 20000,
    hnsw_m: int = 32,
    hnsw_ef_search: int = 128,
):
    """The faiss inner-product index a SupportBank searches over ``data`` (N, D): (index, spec).

    Exact (Flat) up to ``approximate_above`` vectors, HNSW above; ``index_transform`` is the
    embedder's faiss prefix. A module function so the benchmark times the very index the bank builds.
    """
    n, d = data.shape
    transform = index_transform
    match = re.match(r"PCAW?(\d+)", transform or "")
    if match and n < max(2 * int(match.group(1)), int(match.group(1)) + 1):
        # PCA needs more vectors than dimensions to be fitted; a tiny bank is searched normalised only.
        transform = "L2norm"
    approximate = n > approximate_above
    body = f"HNSW{hnsw_m}" if approximate else "Flat"
    spec = f"{transform},{body}" if transform else body
    index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(data)
    if approximate:
        hnsw = faiss.downcast_index(index.index if isinstance(index, faiss.IndexPreTransform) else index)
        hnsw.hnsw.efSearch = hnsw_ef_search
    index.add(data)
    logger.debug("support bank index %s over %d vectors", spec, n)
    return index, spec


class SupportBank:
    """Labelled slices for retrieval, grouped by source image id.

    ``fingerprint`` names what produced embeddings and payloads (embedder, transfer network and
    weights, canvas settings). A bank on disk with another fingerprint is discarded on load,
    never mixed with new entries.
    """

    def __init__(
        self,
        directory: str | os.PathLike | None,
        fingerprint: str,
        index_transform: str = "",
        approximate_above: int = 20000,
        hnsw_m: int = 32,
        hnsw_ef_search: int = 128,
    ):
        self.directory = Path(directory) if directory is not None else None
        self.fingerprint = fingerprint
        self.index_transform = index_transform
        self.approximate_above = int(approximate_above)
        self.hnsw_m = int(hnsw_m)
        self.hnsw_ef_search = int(hnsw_ef_search)
        self._records: dict[str, dict] = {}
        self._shards: dict[str, _Shard] = {}
        self._memory: dict[str, SliceBatch] = {}  # in-memory banks (directory None)
        self._lock = threading.RLock()
        self._index = None
        self.generation = uuid.uuid4().hex
        self._rows: list[tuple[str, int]] = []
        self.index_kind = "empty"

    # ------------------------------------------------------------------ persistence

    @classmethod
    def open(cls, directory, fingerprint: str, **kwargs) -> tuple["SupportBank", LoadReport]:
        bank = cls(directory, fingerprint, **kwargs)
        report = bank._load()
        return bank, report

    @property
    def manifest_path(self) -> Path:
        return self.directory / "manifest.json"

    @contextlib.contextmanager
    def _write_lock(self):
        """Serialises writers within the process (RLock) and across processes (flock)."""
        with self._lock:
            if self.directory is None:
                yield
                return
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(self.directory / ".lock", "w") as lockfile:
                fcntl.flock(lockfile, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lockfile, fcntl.LOCK_UN)

    def _load(self) -> LoadReport:
        report = LoadReport()
        if self.directory is None or not self.manifest_path.exists():
            return report
        try:
            manifest = json.loads(self.manifest_path.read_text())
            version, fingerprint, images = manifest["version"], manifest["fingerprint"], manifest["images"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            report.discarded_all = f"manifest unreadable ({exc})"
            manifest = None
        if manifest is not None and version != FORMAT_VERSION:
            report.discarded_all = f"bank format version {version}, this code writes {FORMAT_VERSION}"
        elif manifest is not None and fingerprint != self.fingerprint:
            report.discarded_all = f"built by {fingerprint!r}, now running {self.fingerprint!r}"
        if report.discarded_all:
            logger.warning("support bank %s discarded: %s; it will be rebuilt from the labels", self.directory, report.discarded_all)
            with self._write_lock():
                self._records.clear()
                self._write_manifest()
                self._remove_orphans()
            return report
        for image_id, record in images.items():
            problem = self._check_shard(record)
            if problem:
                report.dropped[image_id] = problem
                logger.warning("support bank: entries of %r dropped (%s); rebuild them from the label", image_id, problem)
                continue
            try:
                self._shards[image_id] = _Shard(self.directory / "shards" / record["shard"], record)
            except (OSError, ValueError, KeyError) as exc:
                report.dropped[image_id] = f"unreadable shard ({exc})"
                continue
            self._records[image_id] = record
            report.loaded.append(image_id)
        if report.dropped:
            with self._write_lock():
                self._write_manifest()
        with self._write_lock():
            self._remove_orphans()
        self._invalidate()
        logger.info(
            "support bank loaded from %s: %d images, %d slices%s",
            self.directory, len(self._records), self.num_entries,
            f"; {len(report.dropped)} dropped" if report.dropped else "",
        )
        return report

    def _check_shard(self, record: Mapping) -> str:
        shard = self.directory / "shards" / str(record.get("shard", ""))
        if not record.get("shard") or not shard.is_dir():
            return "shard directory missing"
        for name, expected in record.get("files", {}).items():
            path = shard / name
            if not path.is_file():
                return f"{name} missing"
            if path.stat().st_size != expected["size"]:
                return f"{name} truncated or altered (size {path.stat().st_size}, expected {expected['size']})"
            if file_sha256(path) != expected["sha256"]:
                return f"{name} checksum mismatch"
        return ""

    def _write_manifest(self) -> None:
        _write_json_atomic(
            self.manifest_path,
            {"version": FORMAT_VERSION, "fingerprint": self.fingerprint, "images": self._records},
        )

    def _remove_orphans(self) -> None:
        """Shard directories no record points to: leftovers of an interrupted write."""
        shards = self.directory / "shards"
        if not shards.is_dir():
            return
        live = {r["shard"] for r in self._records.values()}
        for path in shards.iterdir():
            if path.name not in live:
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ mutation

    def put(self, image_id: str, batch: SliceBatch, source: Mapping | None = None) -> None:
        """Add the entries of ``image_id``, replacing all its previous entries (never duplicates)."""
        if not isinstance(image_id, str) or not image_id:
            raise BankError("image id must be a non-empty string")
        if len(batch.embeddings) and batch.embeddings.shape[1] != self.dim and self.num_entries:
            raise BankError(f"embedding dimension {batch.embeddings.shape[1]} differs from the bank's {self.dim}")
        labels = sorted({int(v) for m in batch.masks for v in np.unique(m) if v})
        record = {
            "entries": int(len(batch.images)),
            "labels": labels,
            "payload": sorted(batch.payload),
            "payload_labels": [int(v) for v in batch.payload_labels],
            "source": dict(source or {}),
            "added": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        with self._write_lock():
            if self.directory is None:
                self._memory[image_id] = batch
                self._records[image_id] = record
            else:
                old = self._records.get(image_id, {}).get("shard")
                shard_name, files = self._write_shard(image_id, batch)
                record.update(shard=shard_name, files=files)
                self._records[image_id] = record
                self._write_manifest()  # the commit point: from here on the new shard is the truth
                self._shards[image_id] = _Shard(self.directory / "shards" / shard_name, record)
                if old and old != shard_name:
                    shutil.rmtree(self.directory / "shards" / old, ignore_errors=True)
            self._invalidate()
        logger.info("support bank: %r now has %d slices (labels %s)", image_id, record["entries"], labels)

    def _write_shard(self, image_id: str, batch: SliceBatch) -> tuple[str, dict]:
        shards = self.directory / "shards"
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
            meta.write_text(json.dumps({"image_id": image_id, "augmentation": list(batch.augmentation)}))
            files["meta.json"] = {"size": meta.stat().st_size, "sha256": file_sha256(meta)}
            _fsync_dir(tmp)
            name = f"{_safe_name(image_id)}-{uuid.uuid4().hex[:8]}"
            os.rename(tmp, shards / name)
            _fsync_dir(shards)
            return name, files
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def remove(self, image_id: str) -> bool:
        with self._write_lock():
            record = self._records.pop(image_id, None)
            if record is None:
                return False
            self._memory.pop(image_id, None)
            self._shards.pop(image_id, None)
            if self.directory is not None:
                self._write_manifest()
                if record.get("shard"):
                    shutil.rmtree(self.directory / "shards" / record["shard"], ignore_errors=True)
            self._invalidate()
        logger.info("support bank: %r removed", image_id)
        return True

    # ------------------------------------------------------------------ queries

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._records

    def image_ids(self) -> list[str]:
        return sorted(self._records)

    def record(self, image_id: str) -> dict:
        return dict(self._records[image_id])

    def _batches(self) -> Iterable[tuple[str, object]]:
        source = self._memory if self.directory is None else self._shards
        for image_id in sorted(source):
            yield image_id, source[image_id]

    @property
    def num_entries(self) -> int:
        return sum(r["entries"] for r in self._records.values())

    @property
    def dim(self) -> int:
        for _, b in self._batches():
            emb = b.embeddings if isinstance(b, SliceBatch) else b.arrays["embeddings"]
            return int(emb.shape[1])
        return 0

    @property
    def label_values(self) -> list[int]:
        return sorted({v for r in self._records.values() for v in r["labels"]})

    def stats(self) -> dict:
        per_label: dict[str, int] = {}
        negatives = augmented = 0
        for _, b in self._batches():
            masks = b.masks if isinstance(b, SliceBatch) else b.arrays["masks"]
            aug = b.augmentation
            for m, a in zip(masks, aug):
                present = np.unique(m)
                if a:
                    augmented += 1
                    continue  # per-label counts are of real slices a user labelled
                if len(present) == 1 and present[0] == 0:
                    negatives += 1
                for v in present:
                    if v:
                        per_label[str(int(v))] = per_label.get(str(int(v)), 0) + 1
        return {
            "images": len(self._records),
            "slices": self.num_entries,
            "labels": self.label_values,
            "per_label": per_label,
            "negative_slices": negatives,
            "augmented_slices": augmented,
            "index": self.index_kind,
            "fingerprint": self.fingerprint,
        }

    # ------------------------------------------------------------------ search

    def _invalidate(self) -> None:
        self._index = None
        # Changes whenever the entries do: results computed against an older bank are stale.
        self.generation = uuid.uuid4().hex

    def _ensure_index(self):
        with self._lock:
            if self._index is not None:
                return self._index
            rows, vectors = [], []
            for image_id, b in self._batches():
                emb = b.embeddings if isinstance(b, SliceBatch) else b.arrays["embeddings"]
                vectors.append(np.asarray(emb, dtype=np.float32))
                rows.extend((image_id, i) for i in range(len(emb)))
            self._rows = rows
            if not rows:
                self._index, self.index_kind = None, "empty"
                return None
            data = np.ascontiguousarray(np.concatenate(vectors))
            self._index, self.index_kind = self._build_index(data)
            return self._index

    def _build_index(self, data: np.ndarray):
        return build_index(data, self.index_transform, self.approximate_above, self.hnsw_m, self.hnsw_ef_search)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, list[list[tuple[str, int]]]]:
        """Top-``k`` entries per query vector: (scores (N, k'), rows[N][k'] = (image_id, entry))."""
        with self._lock:
            index = self._ensure_index()
            if index is None:
                return np.zeros((len(vectors), 0), np.float32), [[] for _ in range(len(vectors))]
            k = min(int(k), len(self._rows))
            scores, ids = index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
            rows = [[self._rows[i] for i in line if i >= 0] for line in ids]
            return scores[:, : min(len(r) for r in rows) if rows else 0], rows

    def support(self, row: tuple[str, int], score: float = 0.0, labels: Sequence[int] | None = None) -> Support:
        """Materialise one entry. ``labels`` picks and orders the payload's label axis for the transfer step."""
        image_id, i = row
        with self._lock:
            record = self._records[image_id]
            if self.directory is None:
                b = self._memory[image_id]
                image, mask, slice_index, aug, payload = b.images[i], b.masks[i], b.slice_index[i], b.augmentation[i], b.payload
            else:
                s = self._shards[image_id]
                image, mask, slice_index = s.arrays["images"][i], s.arrays["masks"][i], s.arrays["slice_index"][i]
                aug, payload = s.augmentation[i], s.payload
        mask = np.asarray(mask, dtype=np.uint16)
        entry_payload = {}
        if payload:
            # Payload arrays are (E, L, ...) with L in the record's payload_labels order.
            order = record["payload_labels"]
            wanted = list(range(len(order))) if labels is None else [order.index(v) for v in labels]
            entry_payload = {name: np.asarray(arr[i][wanted]) for name, arr in payload.items()}
        return Support(
            ref=SupportRef(image_id=image_id, slice_index=int(slice_index), augmentation=aug),
            image=np.asarray(image, dtype=np.float32),
            mask=mask,
            labels=tuple(int(v) for v in np.unique(mask) if v),
            score=float(score),
            payload=entry_payload,
        )

    def payload_covers(self, image_id: str, labels: Sequence[int]) -> bool:
        """True if the image's cached payloads (if it has any) include every label in ``labels``."""
        record = self._records[image_id]
        return not record["payload"] or set(labels) <= set(record["payload_labels"])

    def embeddings(self) -> np.ndarray:
        """All entry vectors (N, D), for coverage measures; order matches search rows."""
        vecs = [np.asarray(b.embeddings if isinstance(b, SliceBatch) else b.arrays["embeddings"], np.float32) for _, b in self._batches()]
        return np.concatenate(vecs) if vecs else np.zeros((0, 0), np.float32)
