"""How well the support bank covers an unlabelled volume: the active-learning signal.

A slice is covered when some bank entry is close to it in embedding space. A volume's
*uncovered-ness* is the mean over its slices of (1 - best cosine similarity to the bank); the
volume the bank covers worst is the one worth labelling next.
"""
from __future__ import annotations

from typing import Mapping

import faiss
import numpy as np


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def uncovered(bank_vectors: np.ndarray, volumes: Mapping[str, np.ndarray]) -> dict[str, float]:
    """image id -> mean over slices of (1 - max cosine similarity to any bank vector), in [0, 2].

    With an empty bank every volume scores by its own diversity instead (1 - mean similarity of its
    slices to their volume's centroid), so the first proposal is a varied scan, not an arbitrary one.
    """
    out: dict[str, float] = {}
    if len(bank_vectors) == 0:
        for image_id, vecs in volumes.items():
            v = _normalise(vecs)
            centroid = _normalise(v.mean(axis=0, keepdims=True))
            out[image_id] = float(np.mean(1.0 - v @ centroid[0]))
        return out
    index = faiss.IndexFlatIP(bank_vectors.shape[1])
    index.add(_normalise(bank_vectors))
    for image_id, vecs in volumes.items():
        best, _ = index.search(_normalise(vecs), 1)
        out[image_id] = float(np.mean(1.0 - best[:, 0]))
    return out


def propose(bank_vectors: np.ndarray, volumes: Mapping[str, np.ndarray]) -> tuple[str | None, dict[str, float]]:
    """The volume the bank covers worst (ties broken by id for determinism), and all scores."""
    scores = uncovered(bank_vectors, volumes)
    if not scores:
        return None, scores
    best = max(sorted(scores), key=lambda k: scores[k])
    return best, scores
