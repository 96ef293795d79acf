"""What an engine call takes and gives back, apart from the engine that computes it: the per-call
``SegmentOptions``, a ``PreparedVolume`` (canvas slices of one read volume), an ``IngestReport``, and
a ``Segmentation`` (label in the input's geometry, provenance, timings) with its ``save``; and how a
call's stage timings are shared out so they add up to its wall time. The app, the batch workers, eval
and bench read these records; only ``fewshot.engine`` makes them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from fewshot.files import write_json_atomic
from fewshot.volume import CanvasGeometry, Volume, write_label


@dataclass
class PreparedVolume:
    volume: Volume
    canvas: np.ndarray  # (Z, S, S) float32
    geometry: CanvasGeometry
    key: str  # content hash: caches keyed on it never outlive a changed file


@dataclass
class IngestReport:
    image_id: str
    slices: int  # bank entries written (originals + augmented copies)
    positive_slices: int
    negative_slices: int
    augmented_slices: int
    labels: list[int]
    seconds: float


@dataclass
class Segmentation:
    label: np.ndarray  # input array order, uint16
    volume: Volume
    labels: dict[str, int]  # name -> value segmented
    provenance: dict  # label name -> slice -> supports used and scores
    timings: dict[str, float]  # stage -> seconds; the stages and "other" add up to "total" (one clock)
    skipped: dict[str, str] = field(default_factory=dict)  # label name -> why it was not segmented
    # The transfer's own stage timers as it reported them: summed over its worker processes, they can
    # exceed the wall time ``timings`` shares out (benchmarks report both).
    busy: dict[str, float] = field(default_factory=dict)
    # Slices the transfer computed in this call; the others it took unchanged from its last run of the
    # same volume (SAM 2 after a bank change left their inputs alone). None: a reused whole result.
    computed_slices: int | None = None

    def summary(self) -> dict:
        counts = {name: int((self.label == value).sum()) for name, value in self.labels.items()}
        return {
            "image": self.volume.path,
            "shape": list(self.volume.shape),
            "labels": self.labels,
            "voxels": counts,
            "skipped": self.skipped,
            "timings": self.timings,
            "provenance": self.provenance,
        }

    def save(self, path: str | os.PathLike, sidecar: bool = True) -> Path | None:
        write_label(path, self.label, self.volume)
        if not sidecar:
            return None
        side = Path(str(path).removesuffix(".gz").removesuffix(".nii") + ".json")
        write_json_atomic(side, self.summary())  # never a half-written sidecar beside a finished label
        return side


@dataclass(frozen=True)
class SegmentOptions:
    """One call's retrieval knobs over the preset's (None keeps the preset's value). Per call, so that a
    request asking for another ``top_k`` or ``keep`` shares the engine and its caches with the others."""

    top_k: int | None = None  # retrieval.top_k
    keep: int | None = None  # selection.keep: supports per query slice (atlases per scan for scan-level steps)
    matching: bool = True  # re-rank with the preset's matcher, when it has one
    distinct_sources: bool | None = None  # selection.distinct_sources

    def applied_to(self, settings: Mapping) -> dict:
        """The settings this call runs with."""
        out = dict(settings)
        if self.top_k is not None:
            out["retrieval"] = {**settings.get("retrieval", {}), "top_k": int(self.top_k)}
        selection = {k: v for k, v in (("keep", self.keep), ("distinct_sources", self.distinct_sources)) if v is not None}
        if selection:
            out["selection"] = {**settings.get("selection", {}), **selection}
        return out



def within_wall(stages: Mapping[str, float], wall: float) -> dict[str, float]:
    """A transfer's stage seconds as shares of its wall-clock time: stages that ran in several
    worker processes at once add up to more than the time that passed (97 s of registration in a
    54 s inference); they are scaled to it, keeping their proportions."""
    spent = sum(float(v) for v in stages.values())
    if spent <= wall or spent <= 0:
        return {k: float(v) for k, v in stages.items()}
    return {k: float(v) * wall / spent for k, v in stages.items()}


def partition(stages: Mapping[str, float], total: float) -> dict:
    """Stage seconds that add up to ``total`` (one clock, ``time.perf_counter``): what no stage
    timed (reading supports, provenance, waiting) is ``other``. Rounded to 0.1 ms, ``other`` taking
    the rounding, so the stages of a sidecar or an /infer answer sum to its total exactly."""
    out = {k: round(float(v), 4) for k, v in stages.items() if k not in ("total", "other")}
    total = round(float(total), 4)
    out["other"] = round(max(0.0, total - sum(out.values())), 4)
    out["total"] = round(sum(out.values()), 4) if out["other"] == 0.0 else total
    return out

