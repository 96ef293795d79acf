"""Everything timed at one SAM 2 input size (or the classic canvas), on a fresh bank."""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fewshot.meters import PeakRss
from fewshot.bench.memories import MemoryPoint, memories_comparison
from fewshot.bench.plan import BenchData, BenchPlan, one_labelled_slice, write_subvolume
from fewshot.bench.scale import ScalePoint, bank_at_scale
from fewshot.bench.runs import IngestRun, SegmentRun, exactly, rounded, timed_ingest, timed_segment

logger = logging.getLogger(__name__)


@dataclass
class SizeResult:
    image_size: int
    load_s: float
    ingest: IngestRun
    stages: SegmentRun  # sub-volume at the preset's keep
    whole_path: dict[int, SegmentRun]  # k -> sub-volume run
    memories: list[MemoryPoint]
    labels: int  # label values in the bank, all segmented at once by engine.segment
    # k=16 with one label (one SAM 2 object): the setting of the guide figures; memory attention
    # is linear in the number of labels, so the all-labels whole_path figure is that many times dearer.
    one_label_k16: SegmentRun | None = None
    whole_volume: SegmentRun | None = None  # first segmentation of the query volume (preset's size only)
    second_inference: SegmentRun | None = None  # same image, unchanged bank: the finished result is reused
    after_bank_change: SegmentRun | None = None  # same image after a save changed the bank: image features reused
    bank_change: dict | None = None  # what changed the bank before after_bank_change
    scale: list[ScalePoint] = field(default_factory=list)  # the bench's bank and copies of it at ~1e5 entries
    peak_rss_mb: float = 0.0  # the tool's own path: load, ingest, segment (not the re-encoding baseline)

    @property
    def reuse_speedup(self) -> float | None:
        if self.whole_volume is None or self.second_inference is None or self.second_inference.total_s <= 0:
            return None
        return self.whole_volume.total_s / self.second_inference.total_s

    @property
    def feature_reuse_speedup(self) -> float | None:
        """First segmentation vs the same image after a bank change: cached image features, the rest redone."""
        if self.whole_volume is None or self.after_bank_change is None or self.after_bank_change.total_s <= 0:
            return None
        return self.whole_volume.total_s / self.after_bank_change.total_s

    def as_dict(self) -> dict:
        return {
            "image_size": self.image_size, "labels": self.labels, "load_s": rounded(self.load_s),
            "ingest": self.ingest.as_dict(),
            "stages": self.stages.as_dict(),
            "whole_path": {str(k): run.as_dict() for k, run in self.whole_path.items()},
            "one_label_k16": self.one_label_k16.as_dict() if self.one_label_k16 else None,
            "memories": [p.as_dict() for p in self.memories],
            "whole_volume": self.whole_volume.as_dict() if self.whole_volume else None,
            "second_inference": self.second_inference.as_dict() if self.second_inference else None,
            "reuse_speedup": rounded(self.reuse_speedup, 2),
            "after_bank_change": self.after_bank_change.as_dict() if self.after_bank_change else None,
            "feature_reuse_speedup": rounded(self.feature_reuse_speedup, 2),
            "peak_rss_mb": self.peak_rss_mb,
            "bank_change": self.bank_change,
            "scale": [p.as_dict() for p in self.scale],
        }


def bench_size(
    plan: BenchPlan, size: int, data: BenchData, work: Path, models_dir, overrides: Mapping[str, Any],
    device: str, whole_volume: bool, label_names: Mapping[str, int] | None = None,
) -> tuple[SizeResult, Any]:
    """Everything timed at one SAM 2 input size, on a fresh bank. Returns (result, engine).

    ``whole_volume``: also ingest the whole support volume and segment the whole query volume
    twice (done at the preset's own size only; other sizes get a slab just deep enough for k).
    """
    from fewshot.config import load_preset
    from fewshot.engine import Engine
    from fewshot.settings import EngineSettings

    sam2 = load_preset(plan.preset, overrides).get("transfer", {}).get("type") == "sam2"
    # Classic has no input size: registration runs on the canvas, whose size is ``size`` already.
    settings = load_preset(plan.preset, {**overrides, "transfer.image_size": size} if sam2 else overrides)
    config = EngineSettings.from_settings(settings)
    keep = config.selection.keep
    bank_dir = work / f"bank-{size}"
    slabs = work / "subvolumes"
    shutil.rmtree(bank_dir, ignore_errors=True)
    logger.info("bench at image size %d: loading %s", size, plan.preset)
    with PeakRss() as tool_rss:
        t0 = time.perf_counter()
        engine, _ = Engine.from_settings(settings, bank_dir=bank_dir, models_dir=models_dir, label_names=label_names)
        load_s = time.perf_counter() - t0
        support_image, support_label = data.support_image, data.support_label
        support_slab = plan.support_slices if whole_volume else None
        if not whole_volume:
            # Ingestion costs one image-encoder call per entry; a slab deep enough for k supports
            # (each labelled slice also brings its augmented copies) is all the memories need.
            copies = 1 + config.entries.augmentations_per_slice
            support_slab = max(3, -(-max(plan.ks) // copies) + 2)
        if support_slab:
            support_image, support_label = write_subvolume(support_image, support_label, support_slab, slabs,
                                                           f"support-{support_slab}")
        from fewshot.volume import read_volume

        read_volume(support_image)  # untimed: the readers' one-time imports are start-up, not ingestion
        logger.info("bench %d: ingesting %s", size, support_image.name)
        ingest = timed_ingest(engine, "support", support_image, support_label, device, subvolume=bool(support_slab))
        logger.info("bench %d: ingested %d entries in %.1f s", size, ingest.entries, ingest.seconds)

        # Warm-up, untimed: builds the faiss index and lets each network allocate its kernels once.
        # Two slices: a one-slice file is a 2D image, which the engine refuses to read as a volume.
        warm, _ = write_subvolume(data.query_image, data.query_label, 2, slabs, "query-2")
        timed_segment(engine, warm, device)
        sub_image, _ = write_subvolume(data.query_image, data.query_label, plan.subvolume_slices, slabs,
                                       f"query-{plan.subvolume_slices}")
        whole_path = {}
        for k in sorted(set(plan.ks) | {keep}):
            whole_path[k] = timed_segment(engine, sub_image, device, options=exactly(k))
            logger.info("bench %d: whole path k=%d: %.3f s per slice", size, k,
                        whole_path[k].total_s / max(1, whole_path[k].slices))
        one_label = None
        if sam2 and 16 in plan.ks:
            # The label on most support slices, so that every query slice segments it.
            per_label = engine.bank.stats()["per_label"]
            value = int(max(per_label, key=per_label.get)) if per_label else None
            if value is not None:
                one_label = timed_segment(engine, sub_image, device, labels=[value], options=exactly(16))
                logger.info("bench %d: whole path k=16, label %d only: %.3f s per slice", size, value,
                            one_label.total_s / max(1, one_label.slices))
        first = second = changed = bank_change = None
        scale = []
        if whole_volume:
            query = data.query_image
            if plan.query_slices:
                query, _ = write_subvolume(query, data.query_label, plan.query_slices, slabs, f"query-{plan.query_slices}")
            logger.info("bench %d: segmenting %s (cold, then again with cached features)", size, query.name)
            first = timed_segment(engine, query, device, cold=True, options=exactly(keep))
            second = timed_segment(engine, query, device, cold=False, options=exactly(keep))
            bank_change = change_the_bank(engine, data)
            changed = timed_segment(engine, query, device, cold=False, options=exactly(keep))
            logger.info("bench %d: whole volume %.1f s, second inference %.1f s, after a bank change %.1f s "
                        "(%s of %d slices computed)", size, first.total_s, second.total_s, changed.total_s,
                        changed.computed_slices, changed.slices)
    # Re-encoding supports per query is SAM 2's question; registration caches nothing to compare.
    memories = (memories_comparison(engine, sub_image, plan.ks, plan.memory_query_slices)
                if sam2 and plan.memory_query_slices > 0 else [])
    if whole_volume and plan.scale_entries:  # after the tool's own peak RSS was taken
        scale = bank_at_scale(engine, bank_dir, work, sub_image, keep, device, plan.scale_entries)
    if hasattr(engine.transfer, "close"):
        engine.transfer.close()  # the registration worker pool
    result = SizeResult(size, load_s, ingest, whole_path[keep], {k: whole_path[k] for k in plan.ks}, memories,
                        len(engine.bank.label_values), one_label, first, second, changed,
                        bank_change=bank_change, scale=scale, peak_rss_mb=tool_rss.mb)
    return result, engine


def change_the_bank(engine, data: BenchData) -> dict:
    """What a person correcting one slice of another scan does: save that slice as a partial label
    (its slice and augmented copies enter the bank). Without a third case, a new bank generation
    with the same entries (results stale, nothing else changed)."""
    from fewshot.annotation import Annotation

    if data.new_image is None:
        engine.bank.mark_changed()
        return {"how": "a new bank generation, entries unchanged (no third labelled case)"}
    z, axis = one_labelled_slice(data.new_label)
    t0 = time.perf_counter()
    report = engine.ingest("new-label", data.new_image, data.new_label,
                           annotation=Annotation(slices=(z,), axis=axis, how="bench: one corrected slice"))
    return {"how": f"one slice of {data.new_image.name} saved as a partial label", "slice": z, "axis": axis,
            "entries_added": report.slices, "ingest_s": rounded(time.perf_counter() - t0)}
