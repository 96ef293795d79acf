"""One engine call timed: segmentation (stages, network time, peak memory) and ingestion."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fewshot.meters import NetworkClock, PeakRss, cpu_seconds
from fewshot.bench.plan import CLASSIC_BUSY, STAGES, stages_for

logger = logging.getLogger(__name__)


def median(values: Sequence[float]) -> float:
    return float(np.median(values)) if len(values) else float("nan")


def rounded(value: float | None, digits: int = 4):
    return None if value is None else round(float(value), digits)


@dataclass
class SegmentRun:
    """One engine.segment call: its stage timers, how much of it the networks took, its memory peak."""

    total_s: float
    slices: int
    segmented_slices: int  # slices on which at least one label was allowed, i.e. the SAM 2 networks ran
    stages_s: dict[str, float]
    network_s: float
    peak_rss_mb: float
    cpu_s: float = float("nan")  # CPU time of this process and its worker processes
    network_cpu_s: float = float("nan")
    reused: bool = False  # the engine handed back a finished segmentation (same volume, bank, labels, settings)
    busy_s: dict[str, float] | None = None  # stage timers summed over worker processes (classic)
    computed_slices: int | None = None  # slices the transfer computed (the others it took from its last run)

    @property
    def overhead_fraction(self) -> float:
        return max(0.0, self.total_s - self.network_s) / self.total_s if self.total_s > 0 else float("nan")

    @property
    def overhead_cpu_fraction(self) -> float:
        return max(0.0, self.cpu_s - self.network_cpu_s) / self.cpu_s if self.cpu_s > 0 else float("nan")

    def per_slice(self) -> dict[str, float]:
        n = max(1, self.slices)
        return {k: v / n for k, v in self.stages_s.items()}

    def as_dict(self) -> dict:
        n = max(1, self.slices)
        return {
            "total_s": rounded(self.total_s), "slices": self.slices, "segmented_slices": self.segmented_slices,
            "per_slice_s": rounded(self.total_s / n), "stages_s": {k: rounded(v) for k, v in self.stages_s.items()},
            "stages_per_slice_s": {k: rounded(v) for k, v in self.per_slice().items()},
            "network_s": rounded(self.network_s), "non_network_s": rounded(self.total_s - self.network_s),
            "non_network_per_slice_s": rounded((self.total_s - self.network_s) / n),
            "non_network_fraction": rounded(self.overhead_fraction), "peak_rss_mb": self.peak_rss_mb,
            "cpu_s": rounded(self.cpu_s), "cpu_per_slice_s": rounded(self.cpu_s / n),
            "non_network_cpu_fraction": rounded(self.overhead_cpu_fraction), "reused": self.reused,
            "computed_slices": self.computed_slices,
            **({"busy_s": {k: rounded(v) for k, v in self.busy_s.items()}} if self.busy_s is not None else {}),
        }


def exactly(k: int):
    """Options keeping k supports per query slice; retrieval fetches at least that many.
    Exactly k: the distinct-sources rule could leave fewer when top-k holds a slice's augmented copies,
    and the bench times k memories, whatever they show."""
    from fewshot.segmentation import SegmentOptions

    return SegmentOptions(keep=int(k), distinct_sources=False)


def timed_segment(engine, image, device: str, cold: bool = True, labels=None, options=None) -> SegmentRun:
    if cold:
        engine.forget_caches()
    names = stages_for(engine.settings)
    with PeakRss() as rss, NetworkClock(device) as clock:
        t0, c0 = time.perf_counter(), cpu_seconds()
        seg = engine.segment(image, labels=labels, options=options)
        total, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    timings = dict(seg.timings)
    busy = None
    if names is STAGES:
        stages = {name: float(timings.get(name, 0.0)) for name in STAGES if name != "other"}
        stages["other"] = max(0.0, total - sum(stages.values()))
    else:
        stages = {name: float(timings.get(name, 0.0)) for name in names if name != "register_fuse_wall"}
        stages["register_fuse_wall"] = max(0.0, total - sum(stages.values()))
        busy = {name: float(seg.busy.get(name, timings.get(name, 0.0))) for name in CLASSIC_BUSY}
    segmented = set()
    for per_label in seg.provenance.values():
        segmented.update(per_label["slices"])
    return SegmentRun(total, int(timings.get("slices", 0)), len(segmented), stages, clock.seconds, rss.mb,
                      cpu, clock.cpu_seconds, bool(timings.get("reused")), busy, seg.computed_slices)


@dataclass
class IngestRun:
    seconds: float
    entries: int
    positive_slices: int
    augmented_slices: int
    network_s: float
    peak_rss_mb: float
    subvolume: bool  # a slab of the support volume, not all of it
    cpu_s: float = float("nan")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["per_entry_s"] = rounded(self.seconds / max(1, self.entries))
        d["seconds"], d["network_s"], d["cpu_s"] = rounded(self.seconds), rounded(self.network_s), rounded(self.cpu_s)
        return d


def timed_ingest(engine, image_id: str, image: Path, label: Path, device: str, subvolume: bool) -> IngestRun:
    with PeakRss() as rss, NetworkClock(device) as clock:
        t0, c0 = time.perf_counter(), time.process_time()
        report = engine.ingest(image_id, image, label)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return IngestRun(seconds, report.slices, report.positive_slices, report.augmented_slices, clock.seconds,
                     rss.mb, subvolume, cpu)
