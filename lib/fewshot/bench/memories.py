"""SAM 2 memories read from the bank versus re-encoded from the support slices, per query slice and k."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fewshot.bench.runs import exactly, median, rounded

logger = logging.getLogger(__name__)


@dataclass
class RouteTiming:
    per_slice_s: float  # plan (retrieve, fetch, match) + transfer
    transfer_s: float
    encode_s: float  # query image encoder, plus every support's encoders when re-encoding
    attention_decode_s: float
    per_slice_cpu_s: float  # process CPU time of the same (see run_bench's threads)


@dataclass
class MemoryPoint:
    k: int
    query_slices: list[int]
    label: int
    plan_s: float
    cached: RouteTiming
    reencoded: RouteTiming

    @property
    def speedup(self) -> float:
        return self.reencoded.per_slice_s / self.cached.per_slice_s if self.cached.per_slice_s > 0 else float("nan")

    @property
    def cpu_speedup(self) -> float:
        c = self.cached.per_slice_cpu_s
        return self.reencoded.per_slice_cpu_s / c if c > 0 else float("nan")

    def as_dict(self) -> dict:
        return {
            "k": self.k, "query_slices": self.query_slices, "label": self.label, "plan_s": rounded(self.plan_s),
            "cached": {k: rounded(v) for k, v in asdict(self.cached).items()},
            "reencoded": {k: rounded(v) for k, v in asdict(self.reencoded).items()},
            "speedup": rounded(self.speedup, 2), "cpu_speedup": rounded(self.cpu_speedup, 2),
            "transfer_speedup": rounded(self.reencoded.transfer_s / self.cached.transfer_s if self.cached.transfer_s > 0 else None, 2),
        }


def memories_comparison(engine, query: Path, ks: Sequence[int], n_slices: int) -> list[MemoryPoint]:
    """Per query slice at each k: memories read from the bank versus re-encoded from the support slices.

    One label (the bank's most frequent) so the figures are per object, as the seed paper reports them.
    Both routes plan the slice the same way (faiss, bank fetch, LPIPS) and then run the same SAM 2
    attention path; they differ only in where the support memories come from. Slices are taken
    from the middle of ``query`` outwards, skipping those whose plan has fewer than k supports
    or does not allow the label.
    """
    from fewshot.segmentation import PreparedVolume
    from fewshot.types import SlicePlan

    stats = engine.bank.stats()["per_label"]
    label = int(max(stats, key=lambda v: stats[v])) if stats else engine.bank.label_values[0]
    engine.forget_caches()
    prepared = engine.prepare(query)
    embeddings = engine.embedder.embed(prepared.canvas)
    transfer = engine.transfer
    middle_out = sorted(range(len(prepared.canvas)), key=lambda z: abs(z - (len(prepared.canvas) - 1) / 2))
    points = []
    for k in ks:
        chosen, plan_s, cached, reenc = [], [], [], []
        for z in middle_out:
            one = PreparedVolume(prepared.volume, prepared.canvas[z : z + 1], prepared.geometry, prepared.key)
            t0, c0 = time.perf_counter(), time.process_time()
            (plan,), _ = engine.plan(one, embeddings[z : z + 1], [label], exactly(k))
            seconds = (time.perf_counter() - t0, time.process_time() - c0)
            if not plan.labels or len(plan.supports) != k:
                continue
            chosen.append(z)
            plan_s.append(seconds)
            supports = plan.supports
            t0, c0 = time.perf_counter(), time.process_time()
            result = transfer.segment_volume(prepared.canvas[z : z + 1], [SlicePlan(0, supports, plan.labels)], [label])
            cached.append((time.perf_counter() - t0, time.process_time() - c0, result.slices[0].seconds))
            t0, c0 = time.perf_counter(), time.process_time()
            sres = transfer.segment_slice_reencoding(
                prepared.canvas[z], np.stack([s.image for s in supports]), np.stack([s.mask for s in supports]), [label]
            )
            reenc.append((time.perf_counter() - t0, time.process_time() - c0, sres.seconds))
            if len(chosen) == n_slices:
                break
        if not chosen:
            logger.warning("memories: no query slice has %d supports allowing label %d; k=%d skipped", k, label, k)
            continue
        plan_med = median([w for w, _ in plan_s])
        plan_cpu = median([c for _, c in plan_s])

        def route(runs) -> RouteTiming:
            transfer_s = median([t for t, _, _ in runs])
            return RouteTiming(
                per_slice_s=plan_med + transfer_s, transfer_s=transfer_s,
                encode_s=median([s.get("encode", 0.0) for _, _, s in runs]),
                attention_decode_s=median([s.get("attention_decode", 0.0) for _, _, s in runs]),
                per_slice_cpu_s=plan_cpu + median([c for _, c, _ in runs]),
            )

        point = MemoryPoint(k, sorted(chosen), label, plan_med, route(cached), route(reenc))
        logger.info("memories k=%d: cached %.3f s, re-encoded %.3f s per slice (x%.1f)", k,
                    point.cached.per_slice_s, point.reencoded.per_slice_s, point.speedup)
        points.append(point)
    return points
