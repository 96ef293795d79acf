"""How well the support bank covers an unlabelled volume: the active-learning signal.

A slice is covered when some bank entry is close to it, as the bank's own index measures it (so a
PCA-whitened descriptor bank is judged in its whitened space). A volume's *distance from the bank*
is the mean over its slices of (1 - similarity of the nearest entry); the volume the bank covers
worst is the one worth labelling next.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from fewshot.bank import SupportBank


@dataclass
class Proposal:
    image_id: str | None
    score: float
    reason: str
    scores: dict[str, float] = field(default_factory=dict)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def distance_from_bank(bank: SupportBank, volumes: Mapping[str, np.ndarray]) -> dict[str, float]:
    """image id -> mean over its slices of (1 - nearest-entry similarity); {} when the bank is empty."""
    out = {}
    for image_id, vectors in volumes.items():
        scores, _ = bank.search(np.asarray(vectors, np.float32), 1)
        if scores.shape[1] == 0:
            return {}
        out[image_id] = float(np.mean(1.0 - scores[:, 0]))
    return out


def most_typical(volumes: Mapping[str, np.ndarray]) -> tuple[str, float]:
    """With nothing labelled yet, the volume most like the others: one label then serves many."""
    ids = sorted(volumes)
    if len(ids) == 1:
        return ids[0], 0.0
    means = np.stack([_unit(np.asarray(volumes[i], np.float32).mean(axis=0)) for i in ids])
    similarity = means @ means.T
    np.fill_diagonal(similarity, np.nan)
    typicality = np.nanmean(similarity, axis=1)
    best = int(np.argmax(typicality))
    return ids[best], float(typicality[best])


def propose(bank: SupportBank, volumes: Mapping[str, np.ndarray]) -> Proposal:
    """The volume the bank covers worst (ties broken by id, for determinism)."""
    if not volumes:
        return Proposal(None, 0.0, "nothing to propose")
    scores = distance_from_bank(bank, volumes)
    if not scores:
        chosen, score = most_typical(volumes)
        return Proposal(chosen, score, "support bank empty: most typical unlabelled image")
    chosen = max(scores, key=lambda i: (scores[i], i))
    return Proposal(chosen, scores[chosen], "farthest from the support bank", scores)
