"""Per-image slice embeddings on disk, for the active-learning strategy.

``<studies>/.fewshot/embeddings/<embedder key>/<sha256 of the image file>.npy``: keyed by the
file's content, so a replaced image is re-embedded and a renamed one is not; keyed by the
embedder, so switching preset or weights never reuses another network's vectors. File hashes are
remembered per (path, size, mtime, inode) so a strategy call does not re-read every image.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np

from fewshot.files import DigestMemo, atomic_path

logger = logging.getLogger(__name__)


class EmbeddingCache:
    def __init__(self, directory: Path, key: str, compute: Callable[[str], np.ndarray]):
        self.directory = Path(directory) / key
        self.compute = compute
        self._digests = DigestMemo()

    def path_for(self, image_path: str) -> Path:
        return self.directory / f"{self._digests.sha256(image_path)}.npy"

    def has(self, image_path: str) -> bool:
        return self.path_for(image_path).is_file()

    def load(self, image_path: str) -> np.ndarray | None:
        """The cached embeddings, or None when they have not been computed (never computes)."""
        path = self.path_for(image_path)
        try:
            return np.load(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # a torn file from a crash: the warm-up recomputes it
            logger.warning("embedding cache %s unreadable (%s); dropped", path, exc)
            path.unlink(missing_ok=True)
            return None

    def get(self, image_path: str) -> np.ndarray:
        """(Z, D) embeddings of the image's slices, computed once per file content."""
        path = self.path_for(image_path)
        if path.is_file():
            try:
                return np.load(path)
            except (OSError, ValueError) as exc:  # a torn file from a crash: recompute it
                logger.warning("embedding cache %s unreadable (%s); recomputing", path, exc)
        vectors = np.asarray(self.compute(image_path), dtype=np.float32)
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, ".npy", fsync=False) as tmp:  # a cache: a crash costs a recomputation
            np.save(tmp, vectors)
        return vectors
