"""SupportBank: labelled 2D slices, their embeddings in a faiss index, and cached transfer payloads.

On disk (one directory)::

    manifest.json              format version, fingerprint, one record per image id (files + sha256)
    shards/<id>-<generation>/  one directory per image id: images.npy, masks.npy, embeddings.npy,
                               slice_index.npy, payload.<name>.npy, meta.json (augmentations and
                               the label values present in each entry), and for scan-level
                               transfers atlas.image.npy / atlas.mask.npy (the whole canvas volume)
    .lock                      flock: exclusive for writers, shared for readers

Every write goes to a temporary directory first and is renamed into place; the manifest is
replaced last (write, fsync, rename). A crash therefore leaves either the old or the new shard
referenced, never a torn one. On load every file is checked against the manifest; an image whose
shard is missing, truncated or altered is dropped and reported, so the caller can rebuild it from
its source label (the datastore's final labels are the truth, the bank is a cache).

Several processes may share one directory (the CLI, the MONAI Label app and its batch-infer
subprocess). The on-disk manifest is the shared truth: a writer re-reads it under the exclusive
lock before changing anything, so it never drops another process's commit nor deletes a shard the
manifest references; readers pick up other processes' commits when the manifest file changed
(one ``stat`` per search).

A reader may instead be *pinned* to one committed state (``pinned=`` the manifest's bytes, as
``read_manifest`` returns them): it loads the shards that manifest names and never picks up later
commits, so a batch of many workers segments every case against the same bank. ``snapshot`` names
a committed state (the manifest's sha256) the same way in every process. A pinned reader keeps its
shards memory-mapped, so a writer replacing an image meanwhile does not pull the files from under
it (an unlinked file stays readable through its mapping); one that starts after the replaced
shard was deleted cannot load it and says so.

The bank knows nothing of the networks: embeddings are vectors, payloads are named arrays. One
image's entries and their shard directory are ``fewshot.bank_shards``'s; the faiss index is
``fewshot.bank_index``'s; this module owns the manifest, the locks and the search over both.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from fewshot.bank_index import IndexSettings, build_index, index_spec
from fewshot.bank_shards import (
    BankError,
    MemoryShard,
    Shard,
    SliceBatch,
    check_shard,
    labels_per_entry,
    write_shard,
)
from fewshot.files import write_json_atomic
from fewshot.types import Atlas, Support, SupportRef

logger = logging.getLogger(__name__)

# 2: slice_index in the file's own slice order, per-entry label values in meta.json.
FORMAT_VERSION = 2


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    snapshot: str = ""  # the committed state loaded (SupportBank.snapshot)
    dropped: dict[str, str] = field(default_factory=dict)  # image id -> why (to rebuild from its label)
    discarded_all: str = ""  # non-empty when the whole bank was unusable (version or fingerprint)


def manifest_snapshot(raw: bytes) -> str:
    """The name of a committed bank state: the sha256 of its manifest's bytes (first 16 hex)."""
    return hashlib.sha256(raw).hexdigest()[:16]


class SupportBank:
    """Labelled slices for retrieval, grouped by source image id.

    ``fingerprint`` names what produced embeddings and payloads (embedder, transfer network and
    weights, canvas settings). A bank on disk with another fingerprint is discarded on load,
    never mixed with new entries; opened ``read_only`` it is only reported, never touched.
    """

    def __init__(
        self,
        directory: str | os.PathLike | None,
        fingerprint: str,
        index_transform: str = "",
        approximate_above: int = IndexSettings.approximate_above,
        hnsw_m: int = IndexSettings.hnsw_m,
        hnsw_ef_search: int = IndexSettings.hnsw_ef_search,
        read_only: bool = False,
        pinned: bytes | None = None,
        verify: str = "sha256",
    ):
        """``pinned``: a manifest's bytes (``read_manifest``): load that committed state and never
        refresh (implies ``read_only``). ``verify``: check shard files against the manifest by
        ``sha256`` (reads every byte) or by ``size`` only, for readers of a state another process
        has just verified (N workers of a batch would otherwise each read the whole bank)."""
        if verify not in ("sha256", "size"):
            raise BankError(f"verify must be 'sha256' or 'size', not {verify!r}")
        self.directory = Path(directory) if directory is not None else None
        self.fingerprint = fingerprint
        self.index_transform = index_transform
        self.approximate_above = int(approximate_above)
        self.hnsw_m = int(hnsw_m)
        self.hnsw_ef_search = int(hnsw_ef_search)
        self.pinned = pinned
        self.read_only = bool(read_only) or pinned is not None
        self.verify = verify
        self.snapshot = ""  # the committed state held: see manifest_snapshot ("" before any)
        self._records: dict[str, dict] = {}
        self._shards: dict[str, Shard | MemoryShard] = {}
        self._lock = threading.RLock()
        self._flock_depth = 0
        self._index = None
        self.generation = uuid.uuid4().hex
        self._rows: list[tuple[str, int]] = []
        self.index_kind = "empty"
        # The manifest file last read or written, held open so that its inode cannot be reused:
        # "same inode, mtime and size" then reliably means "nobody committed since".
        self._manifest_handle = None
        self._manifest_stamp: tuple | None = None

    # ------------------------------------------------------------------ persistence

    @staticmethod
    def read_manifest(directory: str | os.PathLike) -> bytes | None:
        """The committed manifest's bytes, read under the shared lock (never a state mid-commit),
        or None when the directory holds no bank. Pass them as ``pinned`` to load exactly this state."""
        path = Path(directory) / "manifest.json"
        if not path.exists():
            return None
        with open(Path(directory) / ".lock", "a") as lockfile:
            fcntl.flock(lockfile, fcntl.LOCK_SH)
            try:
                return path.read_bytes()
            except FileNotFoundError:
                return None
            finally:
                fcntl.flock(lockfile, fcntl.LOCK_UN)

    @classmethod
    def open(cls, directory, fingerprint: str, **kwargs) -> tuple["SupportBank", LoadReport]:
        bank = cls(directory, fingerprint, **kwargs)
        report = bank._load()
        return bank, report

    @property
    def manifest_path(self) -> Path:
        return self.directory / "manifest.json"

    @contextlib.contextmanager
    def _file_lock(self, exclusive: bool):
        """Serialises threads (RLock) and processes (flock: exclusive to write, shared to read)."""
        with self._lock:
            if self.directory is None or self._flock_depth:  # flock is per open file: never re-take it
                self._flock_depth += 1
                try:
                    yield
                finally:
                    self._flock_depth -= 1
                return
            if exclusive:
                self.directory.mkdir(parents=True, exist_ok=True)
            elif not self.directory.is_dir():
                yield
                return
            with open(self.directory / ".lock", "a") as lockfile:
                fcntl.flock(lockfile, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                self._flock_depth += 1
                try:
                    yield
                finally:
                    self._flock_depth -= 1
                    fcntl.flock(lockfile, fcntl.LOCK_UN)

    def _write_lock(self):
        if self.read_only:
            raise BankError(f"support bank {self.directory} was opened read-only")
        return self._file_lock(exclusive=True)

    def _load(self) -> LoadReport:
        report = LoadReport()
        if self.directory is None or (self.read_only and self.pinned is None and not self.manifest_path.exists()):
            return report
        with self._file_lock(exclusive=not self.read_only):
            self._sync(repair=not self.read_only, report=report)
        report.loaded = sorted(self._records)
        report.snapshot = self.snapshot
        logger.info(
            "support bank loaded from %s: %d images, %d slices%s",
            self.directory, len(self._records), self.num_entries,
            f"; {len(report.dropped)} dropped" if report.dropped else "",
        )
        return report

    def _disk_stamp(self) -> tuple | None:
        try:
            st = os.stat(self.manifest_path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _hold_manifest(self, handle) -> None:
        if self._manifest_handle is not None:
            self._manifest_handle.close()
        self._manifest_handle = handle
        st = os.fstat(handle.fileno()) if handle is not None else None
        self._manifest_stamp = (st.st_ino, st.st_mtime_ns, st.st_size) if st else None

    def _read_manifest(self) -> tuple[dict, str]:
        """The on-disk records (image id -> record), and why they are unusable ("" when fine)."""
        if self.pinned is not None:
            raw = self.pinned
        else:
            try:
                handle = open(self.manifest_path, "rb")
            except FileNotFoundError:
                self._hold_manifest(None)
                self.snapshot = ""
                return {}, ""
            self._hold_manifest(handle)
            try:
                raw = handle.read()
            except OSError as exc:
                return {}, f"manifest unreadable ({exc})"
        self.snapshot = manifest_snapshot(raw)
        try:
            manifest = json.loads(raw)
            version, fingerprint, images = manifest["version"], manifest["fingerprint"], manifest["images"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return {}, f"manifest unreadable ({exc})"
        if version != FORMAT_VERSION:
            return {}, f"bank format version {version}, this code writes {FORMAT_VERSION}"
        if fingerprint != self.fingerprint:
            return {}, f"built by {fingerprint!r} ({len(images)} images), now running {self.fingerprint!r}"
        return dict(images), ""

    def _sync(self, repair: bool, report: LoadReport | None = None) -> bool:
        """Make the in-memory records those of the on-disk manifest; call under the file lock.

        ``repair`` (exclusive lock only): rewrite a manifest that names damaged or unusable shards
        and delete shard directories it does not reference. Returns True if anything changed.
        """
        report = report if report is not None else LoadReport()
        images, problem = self._read_manifest()
        if problem:
            report.discarded_all = problem
            if repair:
                logger.warning("support bank %s discarded: %s; it will be rebuilt from the labels", self.directory, problem)
            else:
                logger.warning("support bank %s not usable here (%s); left as it is", self.directory, problem)
        changed = self._adopt(images, report)
        if repair:
            if problem or report.dropped:
                self._write_manifest()
            self._remove_orphans()
        return changed

    def _adopt(self, images: Mapping[str, dict], report: LoadReport) -> bool:
        added, removed = [], []
        for image_id in [i for i in self._records if i not in images]:
            self._records.pop(image_id)
            self._shards.pop(image_id, None)
            removed.append(image_id)
        for image_id, record in images.items():
            mine = self._records.get(image_id)
            if mine is not None and mine.get("shard") == record.get("shard"):
                continue  # unchanged: its files were checked when it was first loaded
            problem = check_shard(self.directory / "shards", record, self.verify)
            if not problem:
                try:
                    shard = Shard(self.directory / "shards" / record["shard"], record)
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    problem = f"unreadable shard ({exc})"
            if mine is not None:
                self._records.pop(image_id)
                self._shards.pop(image_id, None)
                removed.append(image_id)
            if problem:
                report.dropped[image_id] = problem
                logger.warning("support bank: entries of %r dropped (%s); rebuild them from the label", image_id, problem)
                continue
            self._records[image_id] = record
            self._shards[image_id] = shard
            added.append(image_id)
        if added or removed:
            self._changed(added, removed)
        return bool(added or removed)

    def refresh(self) -> bool:
        """Pick up what other processes committed since this bank last read or wrote the manifest.

        One ``stat`` when nothing changed. Returns True if the entries changed.
        """
        if self.directory is None or self.pinned is not None:
            return False  # a pinned reader keeps its state for its whole life
        with self._lock:
            if self._disk_stamp() == self._manifest_stamp:
                return False
            with self._file_lock(exclusive=False):
                before = set(self._records)
                changed = self._sync(repair=False)
            if changed:
                logger.info(
                    "support bank %s changed on disk (another process): now %d images (%+d)",
                    self.directory, len(self._records), len(self._records) - len(before),
                )
            return changed

    def _write_manifest(self) -> None:
        write_json_atomic(self.manifest_path,
                          {"version": FORMAT_VERSION, "fingerprint": self.fingerprint, "images": self._records},
                          sort_keys=True, durable=True)
        handle = open(self.manifest_path, "rb")  # ours: we hold the exclusive lock
        self._hold_manifest(handle)
        self.snapshot = manifest_snapshot(handle.read())

    def _remove_orphans(self) -> None:
        """Shard directories the manifest does not reference (leftovers of an interrupted write or of
        a replaced image), and stray temporary manifests. Only under the exclusive lock, right after
        reading the manifest: every shard another process committed is referenced by then."""
        for tmp in self.directory.glob(".manifest.json.*.tmp"):
            tmp.unlink(missing_ok=True)
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
        entry_labels = labels_per_entry(batch.masks)
        labels = sorted({v for present in entry_labels for v in present})
        record = {
            "entries": int(len(batch.images)),
            "labels": labels,
            "payload": sorted(batch.payload),
            "payload_labels": [int(v) for v in batch.payload_labels],
            "source": dict(source or {}),
            "added": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if batch.atlas is not None:
            a = batch.atlas
            record["atlas"] = {"spacing": [float(v) for v in a.spacing], "key": a.key,
                               "components": {str(k): int(v) for k, v in sorted(a.components.items())},
                               "shape": [int(v) for v in a.image.shape], "axis": int(a.axis),
                               "directions": [[float(v) for v in d] for d in a.directions]}
        with self._write_lock():
            if self.directory is not None:
                self._sync(repair=True)  # other processes' commits first: never write over them
            if len(batch.embeddings) and self.num_entries and batch.embeddings.shape[1] != self.dim:
                raise BankError(f"embedding dimension {batch.embeddings.shape[1]} differs from the bank's {self.dim}")
            replaced = image_id in self._records
            if self.directory is None:
                self._shards[image_id] = MemoryShard(batch, entry_labels)
                self._records[image_id] = record
            else:
                old = self._records.get(image_id, {}).get("shard")
                shard_name, files = write_shard(self.directory / "shards", image_id, batch, entry_labels)
                record.update(shard=shard_name, files=files)
                self._records[image_id] = record
                self._write_manifest()  # the commit point: from here on the new shard is the truth
                self._shards[image_id] = Shard(self.directory / "shards" / shard_name, record)
                if old and old != shard_name:
                    shutil.rmtree(self.directory / "shards" / old, ignore_errors=True)
            self._changed([image_id], [image_id] if replaced else [])
        logger.info("support bank: %r now has %d slices (labels %s)", image_id, record["entries"], labels)

    def remove(self, image_id: str) -> bool:
        with self._write_lock():
            if self.directory is not None:
                self._sync(repair=True)
            record = self._records.pop(image_id, None)
            if record is None:
                return False
            self._shards.pop(image_id, None)
            if self.directory is not None:
                self._write_manifest()
                if record.get("shard"):
                    shutil.rmtree(self.directory / "shards" / record["shard"], ignore_errors=True)
            self._changed([], [image_id])
        logger.info("support bank: %r removed", image_id)
        return True

    # ------------------------------------------------------------------ queries

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._records

    def image_ids(self) -> list[str]:
        self.refresh()
        return sorted(self._records)

    def record(self, image_id: str) -> dict:
        return dict(self._records[image_id])

    def _batches(self) -> Iterable[tuple[str, Shard | MemoryShard]]:
        for image_id in sorted(self._shards):
            yield image_id, self._shards[image_id]

    @property
    def num_entries(self) -> int:
        return sum(r["entries"] for r in self._records.values())

    @property
    def dim(self) -> int:
        for _, b in self._batches():
            return int(b.arrays["embeddings"].shape[1])
        return 0

    @property
    def label_values(self) -> list[int]:
        return sorted({v for r in self._records.values() for v in r["labels"]})

    def index_spec(self) -> str:
        """The index a search runs on now (what ``build_index`` builds for the current entries)."""
        n = self.num_entries
        return index_spec(n, self.index_transform, self.approximate_above, self.hnsw_m) if n else "empty"

    def stats(self) -> dict:
        self.refresh()
        per_label: dict[str, int] = {}
        negatives = augmented = payload_bytes = 0
        with self._lock:
            for _, b in self._batches():
                payload_bytes += sum(int(a.nbytes) for a in getattr(b, "payload", {}).values())
                for present, aug in zip(b.entry_labels, b.augmentation):
                    if aug:
                        augmented += 1
                        continue  # per-label counts are of real slices a user labelled
                    if not present:
                        negatives += 1
                    for v in present:
                        per_label[str(v)] = per_label.get(str(v), 0) + 1
            return {
                "images": len(self._records),
                "slices": self.num_entries,
                "labels": self.label_values,
                "per_label": per_label,
                "negative_slices": negatives,
                "augmented_slices": augmented,
                "index": self.index_spec(),
                "fingerprint": self.fingerprint,
                "snapshot": self.snapshot,  # the committed state: what a batch pins to
                "atlases": sum(1 for r in self._records.values() if r.get("atlas")),
                # Cached transfer payloads (SAM 2 memories: float16, memory-mapped from the shards, so
                # they cost disk and page cache, not resident memory per process).
                "payload_bytes_per_entry": int(payload_bytes / self.num_entries) if self.num_entries else 0,
            }

    # ------------------------------------------------------------------ search

    def _changed(self, added: Sequence[str], removed: Sequence[str]) -> None:
        """Entries changed: a new generation; the index grows in place where that gives the index a
        rebuild would (pure additions, no fitted transform, same kind), else it is rebuilt lazily."""
        # Results computed against an older bank are stale from here on.
        self.generation = uuid.uuid4().hex
        if self._index is None:
            return
        spec = index_spec(self.num_entries, self.index_transform, self.approximate_above, self.hnsw_m)
        if removed or spec != self.index_kind or "PCA" in spec:
            # faiss HNSW cannot delete, and a PCA is fitted on all entries: rebuild at the next search.
            self._index, self._rows = None, []
            return
        for image_id in added:
            emb = np.ascontiguousarray(self._shards[image_id].read("embeddings"), dtype=np.float32)
            self._index.add(emb)
            self._rows.extend((image_id, i) for i in range(len(emb)))

    def mark_changed(self) -> None:
        """A new generation, as a saved label makes: results keyed by the old one are stale (cached
        image features are not), and the index is rebuilt on the next search."""
        self.generation = uuid.uuid4().hex
        self._index, self._rows = None, []

    def _ensure_index(self):
        with self._lock:
            if self._index is not None:
                return self._index
            rows, data = [], None
            for image_id, b in self._batches():
                emb = b.read("embeddings")
                if data is None:  # one buffer, filled shard by shard: the build's only copy of the vectors
                    data = np.empty((self.num_entries, emb.shape[1]), np.float32)
                data[len(rows): len(rows) + len(emb)] = emb
                rows.extend((image_id, i) for i in range(len(emb)))
            self._rows = rows
            if not rows:
                self._index, self.index_kind = None, "empty"
                return None
            self._index, self.index_kind = self._build_index(data[: len(rows)])
            return self._index

    def _build_index(self, data: np.ndarray):
        return build_index(data, self.index_transform, self.approximate_above, self.hnsw_m, self.hnsw_ef_search)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, list[list[tuple[str, int]]]]:
        """Top-``k`` entries per query vector: (scores (N, k'), rows[N][k'] = (image_id, entry)).

        k' is the same for every query: the smallest number of hits any query got (an approximate
        index can return fewer than k), so scores and rows always line up.
        """
        self.refresh()
        with self._lock:
            index = self._ensure_index()
            if index is None:
                return np.zeros((len(vectors), 0), np.float32), [[] for _ in range(len(vectors))]
            k = min(int(k), len(self._rows))
            scores, ids = index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
            found = int((ids >= 0).sum(axis=1).min()) if len(ids) else 0
            rows = [[self._rows[i] for i in line[:found]] for line in ids]
            return scores[:, :found], rows

    def _entry(self, row: tuple[str, int]):
        image_id, i = row
        with self._lock:
            return self._records[image_id], self._shards[image_id], int(i)

    def entry_labels(self, row: tuple[str, int]) -> tuple[int, ...]:
        _, shard, i = self._entry(row)
        return shard.entry_labels[i]

    def source_slice(self, row: tuple[str, int]) -> tuple[str, int]:
        """(image id, slice) the entry was cut from: an augmented copy shares its original's."""
        _, shard, i = self._entry(row)
        return row[0], int(shard.arrays["slice_index"][i])

    def images(self, rows: Sequence[tuple[str, int]]) -> np.ndarray:
        """(M, S, S) float32 images of ``rows``, without their payloads (for re-ranking)."""
        out = []
        for row in rows:
            _, shard, i = self._entry(row)
            out.append(shard.arrays["images"][i])
        return np.asarray(out, dtype=np.float32)

    def support(self, row: tuple[str, int], score: float = 0.0, labels: Sequence[int] | None = None) -> Support:
        """Materialise one entry. ``labels`` picks and orders the payload's label axis for the transfer step."""
        record, shard, i = self._entry(row)
        entry_payload = {}
        if shard.payload:
            # Payload arrays are (E, L, ...) with L in the record's payload_labels order.
            order = record["payload_labels"]
            wanted = list(range(len(order))) if labels is None else [order.index(v) for v in labels]
            entry_payload = {name: np.asarray(arr[i][wanted]) for name, arr in shard.payload.items()}
        return Support(
            ref=SupportRef(image_id=row[0], slice_index=int(shard.arrays["slice_index"][i]), augmentation=shard.augmentation[i]),
            image=np.asarray(shard.arrays["images"][i], dtype=np.float32),
            mask=np.asarray(shard.arrays["masks"][i], dtype=np.uint16),
            labels=shard.entry_labels[i],
            score=float(score),
            payload=entry_payload,
            key=f"{shard.token}/{i}",
        )

    def atlas_ids(self) -> list[str]:
        """Images whose whole labelled scan is cached (for scan-level transfers)."""
        self.refresh()
        with self._lock:
            return sorted(i for i, r in self._records.items() if r.get("atlas"))

    def atlas(self, image_id: str) -> Atlas:
        """The cached atlas of ``image_id``, its arrays read into memory (float32 image)."""
        with self._lock:
            shard = self._shards[image_id]
        a = shard.atlas
        if a is None:
            raise BankError(f"{image_id!r} has no cached atlas volume: re-ingest it with a scan-level preset")
        return Atlas(image_id=image_id, image=np.asarray(a.image, dtype=np.float32), mask=np.asarray(a.mask, np.uint16),
                     spacing=a.spacing, components=dict(a.components), key=a.key, axis=a.axis,
                     directions=a.directions)

    def payload_covers(self, image_id: str, labels: Sequence[int]) -> bool:
        """True if the image's cached payloads (if it has any) include every label in ``labels``."""
        record = self._records[image_id]
        return not record["payload"] or set(labels) <= set(record["payload_labels"])

    def embeddings(self) -> np.ndarray:
        """All entry vectors (N, D), for coverage measures; order matches a freshly built index."""
        with self._lock:
            vecs = [np.asarray(b.read("embeddings"), np.float32) for _, b in self._batches()]
        return np.concatenate(vecs) if vecs else np.zeros((0, 0), np.float32)
