"""The issue's targets against what was measured, the guide's figures, and the CPU recommendation."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from fewshot.bench.retrieval import RetrievalPoint
from fewshot.bench.runs import median, rounded
from fewshot.bench.sizes import SizeResult

logger = logging.getLogger(__name__)


@dataclass
class TargetCheck:
    what: str
    target: str
    measured: float | None
    unit: str
    met: bool | None  # None: not measured in this run (the note says why)
    note: str = ""
    # The same figure from process CPU time instead of wall time: on a machine shared with other
    # jobs and run with --threads 1, it is what an idle core would take.
    measured_cpu: float | None = None
    met_cpu: bool | None = None


def _finite(value) -> bool:
    return value is not None and bool(np.isfinite(value))


def _check(what, target, measured, unit, ok: Callable[[float], bool], note="", measured_cpu=None) -> TargetCheck:
    check = TargetCheck(what, target, None, unit, None, note)
    if _finite(measured):
        check.measured, check.met = round(float(measured), 4), bool(ok(float(measured)))
    if _finite(measured_cpu):
        check.measured_cpu, check.met_cpu = round(float(measured_cpu), 4), bool(ok(float(measured_cpu)))
    return check


NOT_APPLICABLE_CLASSIC = "not applicable to the classic preset: no networks, nothing to cache or re-encode"


def evaluate_targets(sizes: Mapping[int, SizeResult], retrieval: Sequence[RetrievalPoint],
                     default_size: int, quick: bool, sam2: bool = True) -> list[TargetCheck]:
    """The issue's targets table, each with what this run measured (None where it does not apply)."""
    checks = []
    for size, res in sizes.items():
        at16 = next((p for p in res.memories if p.k == 16), None)
        checks.append(_check(
            f"per-slice time at k=16, cached memories vs re-encoding each support per query ({size}²)",
            ">= 4x faster", at16.speedup if at16 else None, "x", lambda v: v >= 4.0,
            "one label; both routes include planning (faiss, bank fetch, LPIPS)" if at16
            else ("k=16 not measured" if sam2 else NOT_APPLICABLE_CLASSIC),
            at16.cpu_speedup if at16 else None,
        ))
    res512 = sizes.get(512) if sam2 else None
    run = res512.whole_path.get(16) if res512 else None
    checks.append(_check(
        "per-slice time at k=16 at 512², whole path (engine.segment, all labels)", "<= 1.5 s",
        run.total_s / max(1, run.slices) if run else None, "s", lambda v: v <= 1.5,
        f"{run.slices} slices, {res512.labels} labels batched" if run
        else ("512 with k=16 not measured in this run" if sam2 else NOT_APPLICABLE_CLASSIC),
        run.cpu_s / max(1, run.slices) if run else None,
    ))
    one = res512.one_label_k16 if res512 else None
    checks.append(_check(
        "per-slice time at k=16 at 512², whole path (engine.segment, one label)", "<= 1.5 s",
        one.total_s / max(1, one.slices) if one else None, "s", lambda v: v <= 1.5,
        "one SAM 2 object, the setting of the issue's guide figures" if one
        else ("512 with k=16 not measured in this run" if sam2 else NOT_APPLICABLE_CLASSIC),
        one.cpu_s / max(1, one.slices) if one else None,
    ))
    ratio = (run.total_s / one.total_s) if run and one and one.total_s > 0 else None
    checks.append(_check(
        "all labels vs one label per slice at k=16, 512² (engine.segment, same slices, one run)", "<= 1.6x",
        ratio, "x", lambda v: v <= 1.6,
        f"{res512.labels} labels batched as SAM 2 objects on shared image features; memory attention is per "
        "object (each attends over its own k x (image_size/16)² memory tokens)" if ratio
        else ("512 with k=16 not measured in this run" if sam2 else NOT_APPLICABLE_CLASSIC),
        (run.cpu_s / one.cpu_s) if ratio and one.cpu_s > 0 else None,
    ))
    default = sizes[default_size]
    vol = default.whole_volume if sam2 else None
    checks.append(_check(
        f"non-network overhead per slice, whole volume at {default_size}²", "<= 10 % of the total",
        vol.overhead_fraction * 100 if vol else None, "%", lambda v: v <= 10.0,
        "everything outside nn.Module forward calls, including file reading and SAM 2's glue ops" if sam2
        else NOT_APPLICABLE_CLASSIC,
        vol.overhead_cpu_fraction * 100 if vol else None,
    ))
    # The issue asks for a second inference that reuses cached image features. With an unchanged bank
    # the engine now returns the finished result, which is faster still but redoes no work at all, so
    # it says nothing about the feature cache: the target is judged on a second inference after the
    # bank changed (retrieval, matching, attention and decode run again on cached image features).
    first, changed = default.whole_volume, default.after_bank_change
    reuse_note = (f"with an unchanged bank the finished result is returned: {default.reuse_speedup:.0f}x faster "
                  "(not counted: no work is redone)" if default.reuse_speedup else "")
    how = (default.bank_change or {}).get("how", "")
    computed = (f"{changed.computed_slices} of {changed.slices} slices computed again, the others taken from the "
                "last propagation; " if changed and changed.computed_slices is not None else "")
    checks.append(_check(
        f"second inference on the same image after a bank change ({default_size}²)", ">= 5x faster than the first",
        default.feature_reuse_speedup, "x", lambda v: v >= 5.0,
        (f"bank change: {how}; " if how else "") + computed
        + ("query embeddings" + (" and SAM 2 image features" if sam2 else "")
           + " come from the cache, retrieval and matching run again"
           + ("" if sam2 else ", registration too (it caches nothing)") + "; " + reuse_note),
        first.cpu_s / changed.cpu_s if first and changed and changed.cpu_s > 0 else None,
    ))
    big = next((p for p in retrieval if p.entries >= 1_000_000), None)
    largest = max(retrieval, key=lambda p: p.entries) if retrieval else None
    why = "" if big else f"1e6 not measured in this run (largest: {largest.entries if largest else 0})"
    checks.append(_check("faiss query latency at 1e6 entries", "<= 5 ms per query",
                         big.batch_ms_per_query if big else None, "ms", lambda v: v <= 5.0,
                         why or f"{big.index}, batched queries; single query {big.single_ms_per_query:.2f} ms"))
    recall_note = why
    if big:
        low, high = big.recall_ci95
        verdict = ("the whole interval is above the target" if low >= 0.95 else
                   "the whole interval is below the target" if high < 0.95 else
                   "the interval straddles the target: not distinguishable from 0.95 with this many queries")
        recall_note = (f"{big.index} against exact search, clustered vectors, {big.queries} queries; "
                       f"95 % CI {low:.4f}-{high:.4f}: {verdict}")
    checks.append(_check("faiss recall@16 at 1e6 entries", ">= 0.95", big.recall_at_k if big else None, "",
                         lambda v: v >= 0.95, recall_note))
    checks.append(TargetCheck(
        "PUT /datastore/label response (ingestion is asynchronous)", "<= 0.5 s", None, "s", None,
        f"a server endpoint, not timed by this bench; the ingestion it schedules takes {default.ingest.seconds:.1f} s",
    ))
    small = default.scale[0] if default.scale else None
    large = default.scale[-1] if len(default.scale) > 1 else None
    growth = large.rss_after_mb - small.rss_after_mb if large else None
    checks.append(_check(
        f"resident memory with {large.entries if large else '1e5'} bank entries, against the bench's own bank",
        "cached memories not held in RAM: RSS growth < 5 % of the bank's bytes", growth, "MB",
        lambda v: v < 0.05 * large.disk_gb * 1000,
        (f"{small.entries} -> {large.entries} entries ({large.index}): RSS {small.rss_after_mb:.0f} -> "
         f"{large.rss_after_mb:.0f} MB for a bank of {large.disk_gb:.1f} GB (memories float16, memory-mapped; "
         f"the growth is mostly the faiss index); per slice {small.per_slice_s:.2f} -> {large.per_slice_s:.2f} s, "
         f"retrieval {small.retrieve_ms_per_slice:.1f} -> {large.retrieve_ms_per_slice:.1f} ms per slice, index build "
         f"{large.index_build_s:.0f} s") if large else "not measured in this run (bench.scale_entries)",
    ))
    checks.append(_check(
        "peak RSS with SAM 2.1 tiny + DINOv2-S on CPU" if sam2 and not quick else
        "peak RSS (tiny random networks)" if sam2 else "peak RSS (classic, this process)",
        "<= 4 GB", default.peak_rss_mb / 1024, "GB", lambda v: v <= 4.0,
        f"load, ingest and segment at {default_size}² (sampled every 20 ms)"
        + ("" if sam2 else "; the registration worker processes hold their own memory, not counted here"),
    ))
    return checks


# Issue 4's CPU guide figures (SAM 2.1 hiera-tiny, random weights, 2 cores): size -> stage -> k -> seconds.
GUIDE = {
    1024: {"encode": 2.3, "attention_decode": {1: 1.1, 4: 2.4, 16: 7.4}},
    512: {"encode": (0.6, 0.9), "attention_decode": {1: 0.15, 4: 0.23, 16: 0.58}},
}


def guide_comparison(sizes: Mapping[int, SizeResult]) -> list[dict]:
    rows = []
    for size, guide in GUIDE.items():
        res = sizes.get(size)
        if res is None:
            continue
        for p in res.memories:
            if p.k in guide["attention_decode"]:
                rows.append({"image_size": size, "stage": "memory attention + decode", "k": p.k,
                             "guide_s": guide["attention_decode"][p.k], "measured_s": rounded(p.cached.attention_decode_s)})
        if res.memories:
            rows.append({"image_size": size, "stage": "query encode", "k": None, "guide_s": guide["encode"],
                         "measured_s": rounded(median([p.cached.encode_s for p in res.memories]))})
    return rows


# When no setting fits the budget: more supports are still worth up to this much extra time per slice.
AFFORDABLE_SLOWDOWN = 0.25


def recommend_cpu_defaults(sizes: Mapping[int, SizeResult], budget_s: float, top_k: int | None = None,
                           basis: str = "wall") -> dict:
    """The (image_size, k) for CPU, from the whole-path time per slice of each measured setting.

    More supports is what few-shot accuracy gains from (each is another labelled example), while a
    larger SAM 2 input only re-samples the same 256² canvas, so k is preferred over size:
    the largest k (then size) that fits ``budget_s``; if none fits, the fastest size with the
    largest k that costs at most ``AFFORDABLE_SLOWDOWN`` more than that size's fastest setting.
    """
    options = []
    for size, res in sizes.items():
        for k, run in res.whole_path.items():
            seconds = run.cpu_s if basis == "cpu" else run.total_s
            options.append((size, k, seconds / max(1, run.slices)))
    options = [o for o in options if np.isfinite(o[2])]
    if not options:
        return {}
    fitting = [o for o in options if o[2] <= budget_s]
    if fitting:
        size, k, per_slice = max(fitting, key=lambda o: (o[1], o[0]))
        reason = (f"largest k, then largest image_size, whose whole-path time per slice fits {budget_s} s: "
                  f"image_size {size} with k={k} takes {per_slice:.2f} s per slice")
    else:
        fastest = min(options, key=lambda o: o[2])
        limit = fastest[2] * (1 + AFFORDABLE_SLOWDOWN)
        size, k, per_slice = max((o for o in options if o[0] == fastest[0] and o[2] <= limit), key=lambda o: o[1])
        reason = (f"no measured setting fits {budget_s} s per slice; image_size {size} is the fastest size "
                  f"({fastest[2]:.2f} s per slice at k={fastest[1]}), and k={k} ({per_slice:.2f} s) is the most "
                  f"supports within {AFFORDABLE_SLOWDOWN:.0%} of that")
    table = {f"{s}/k={kk}": round(t, 3) for s, kk, t in sorted(options)}
    out = {"basis": f"{basis} time", "transfer.image_size": size, "selection.keep": k, "per_slice_s": round(per_slice, 3),
           "budget_s": budget_s, "measured_per_slice_s": table, "reason": reason}
    if top_k is not None and k >= top_k:
        out["caveat"] = (f"selection.keep={k} >= retrieval.top_k={top_k}: the matcher has nothing to re-rank and is "
                         "skipped (part of why this k is fast); raise retrieval.top_k to keep LPIPS re-ranking")
    return out
