"""``run_bench``: the whole benchmark, written to bench.json (after each section) and PNG plots."""
from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from fewshot.files import write_json_atomic
from fewshot.meters import max_rss_bytes
from fewshot.settings import EngineSettings
from fewshot.bench.plan import RECALL_K, STAGES, choose_preset, find_data, full_plan, quick_plan, stages_for
from fewshot.bench.retrieval import RetrievalPoint, retrieval_scale
from fewshot.bench.runs import rounded
from fewshot.bench.sizes import SizeResult, bench_size
from fewshot.bench.targets import evaluate_targets, guide_comparison, recommend_cpu_defaults

logger = logging.getLogger(__name__)


def write_plots(out: Path, report: dict) -> list[str]:
    from fewshot.plots import bar_chart, line_chart

    written = []
    sizes = report.get("sizes", {})
    for size, res in sizes.items():
        names = report.get("stage_names") or STAGES
        per_slice = {names[k]: v for k, v in res["stages"]["stages_per_slice_s"].items()}
        what = f"SAM 2 at {size}²" if names is STAGES or report.get("transfer") == "sam2" else f"classic, canvas {size}²"
        written.append(bar_chart(per_slice, f"Seconds per slice by stage, {what} "
                                 f"(k={report['default_keep']}, {res['stages']['slices']} slices)",
                                 "seconds per slice", out / f"stages_{size}.png"))
    mem = {}
    for size, res in sizes.items():
        if res["memories"]:
            # The transfer step only: planning (faiss, LPIPS) is the same for both routes and is in the JSON.
            mem[f"cached, {size}²"] = [(p["k"], p["cached"]["transfer_s"]) for p in res["memories"]]
            mem[f"re-encoded, {size}²"] = [(p["k"], p["reencoded"]["transfer_s"]) for p in res["memories"]]
    if mem:
        written.append(line_chart(mem, "SAM 2 per slice: cached memories vs re-encoded supports",
                                  "k (supports per query slice)", "seconds per slice, transfer step (one label)",
                                  out / "memories.png", logx=True, logy=True))
    path = {f"{size}²": [(int(k), r["per_slice_s"]) for k, r in res["whole_path"].items()] for size, res in sizes.items()}
    if path:
        written.append(line_chart(path, "Whole path per slice (engine.segment, all labels)", "k (supports per slice)",
                                  "seconds per slice", out / "whole_path_vs_k.png", logx=True))
    volume = {}
    for size, res in sizes.items():
        volume[f"ingest {size}²" + (" (slab)" if res["ingest"]["subvolume"] else "")] = res["ingest"]["seconds"]
        if res["whole_volume"]:
            volume[f"segment {size}²"] = res["whole_volume"]["total_s"]
            volume[f"2nd segment {size}² (result reused)"] = res["second_inference"]["total_s"]
            if res.get("after_bank_change"):
                volume[f"after a bank change {size}² (features reused)"] = res["after_bank_change"]["total_s"]
    if volume:
        written.append(bar_chart(volume, "Whole volumes: ingestion and segmentation", "seconds", out / "whole_volume.png"))
    retrieval = report.get("retrieval") or []
    if retrieval:
        written.append(line_chart(
            {"batched queries": [(p["entries"], p["batch_ms_per_query"]) for p in retrieval],
             "one query per call": [(p["entries"], p["single_ms_per_query"]) for p in retrieval]},
            "faiss query latency vs bank size", "bank entries", "ms per query", out / "retrieval_latency.png",
            logx=True, logy=True))
        written.append(line_chart(
            {f"recall@{RECALL_K}": [(p["entries"], p["recall_at_k"]) for p in retrieval]},
            "faiss recall against exact search", "bank entries", f"recall@{RECALL_K}", out / "retrieval_recall.png",
            logx=True))
        written.append(line_chart(
            {"index build": [(p["entries"], max(p["build_s"], 1e-4)) for p in retrieval]},
            "faiss index build time", "bank entries", "seconds", out / "retrieval_build.png", logx=True, logy=True))
    return [str(p) for p in written]


def _environment(device: str) -> dict:
    import faiss
    import torch

    return {
        "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "faiss": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(), "device": device,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _write_json(out: Path, report: dict) -> None:
    write_json_atomic(out / "bench.json", report, default=str)


def run_bench(
    out: str | os.PathLike,
    device: str | None = None,
    quick: bool = False,
    models_dir: str | os.PathLike | None = None,
    preset: str | None = None,
    data: str | os.PathLike | None = None,
    synthetic: bool = False,
    sizes: Sequence[int] | None = None,
    ks: Sequence[int] | None = None,
    retrieval_sizes: Sequence[int] | None = None,
    scale_entries: Sequence[int] | None = None,
    support_slices: int | None = None,
    query_slices: int | None = None,
    memory_slices: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> dict:
    """Run the benchmark, write ``out/bench.json`` and the plots; returns the report.

    ``threads``: torch and faiss threads (default: theirs, one per core). On a machine shared with
    other jobs, fewer threads than cores avoids OpenMP workers spinning against each other.
    """
    import faiss
    import torch

    from fewshot.config import load_preset
    from fewshot.presets import resolve_device

    if threads:
        torch.set_num_threads(int(threads))
        faiss.omp_set_num_threads(int(threads))

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(overrides or {})
    if device:
        overrides["device"] = device
    preset = preset or ("random-tiny" if quick else choose_preset(models_dir))
    base = load_preset(preset, overrides)
    if base.get("transfer", {}).get("type") == "atlas":
        # Its figures are per scan, not per slice and k: eval measures them (metrics.json, "timing").
        raise ValueError(f"preset {preset!r} registers whole scans (multi-atlas): bench times slice-level "
                         "paths. Its seconds per volume come from `python -m fewshot eval` (metrics.json, timing); "
                         "`bench --preset classic-slices` times the slice-level weights-free path")
    sam2 = base.get("transfer", {}).get("type") == "sam2"
    if sam2:
        from fewshot.transfer.sam2_model import resolve_image_size

        preset_size = resolve_image_size(base["transfer"].get("image_size"), resolve_device(base.get("device")))
        plan = quick_plan(preset, preset_size) if quick else full_plan(preset, preset_size)
    else:
        if sizes:
            raise ValueError(f"--sizes are SAM 2 input sizes; preset {preset!r} transfers labels by "
                             f"{base.get('transfer', {}).get('type')} on the canvas (set volume.canvas instead)")
        # One size, the canvas; k up to the preset's own keep in quick mode (16 registrations per slice is slow).
        typed = EngineSettings.from_settings(base)
        preset_size = typed.volume.canvas
        plan = quick_plan(preset, preset_size) if quick else full_plan(preset, preset_size)
        keep = typed.selection.keep
        plan = replace(plan, sizes=(preset_size,),
                       ks=tuple(sorted({1, keep})) if quick else tuple(sorted({1, 4, keep, 16})))
        if quick:  # every slice is k registrations on the canvas: thin slabs keep CI short
            plan = replace(plan, subvolume_slices=2, support_slices=6, query_slices=4)
    plan = replace(plan, **{k: tuple(int(x) for x in v) for k, v in
                            {"sizes": sizes, "ks": ks, "retrieval_sizes": retrieval_sizes}.items() if v})
    # Slabs instead of whole volumes for the whole-volume runs, and query slices for the memories
    # comparison (0 skips it): a shorter run on a busy machine, told in bench.json's plan.
    plan = replace(plan, **{k: int(v) for k, v in {"support_slices": support_slices, "query_slices": query_slices,
                                                    "memory_query_slices": memory_slices}.items() if v is not None})
    if scale_entries is not None:  # [0] or [] skips the bank-at-scale run
        plan = replace(plan, scale_entries=tuple(int(x) for x in scale_entries if int(x) > 0))
    device = resolve_device(base.get("device"))
    default_keep = EngineSettings.from_settings(base).selection.keep
    work = Path(tempfile.mkdtemp(prefix="fewshot-bench-"))
    report: dict = {
        "mode": "quick" if quick else "full", "complete": False, "preset": preset,
        "weights": "random" if base.get("random_weights") else "pretrained",
        "started": _dt.datetime.now().isoformat(timespec="seconds"), "environment": _environment(device),
        "plan": asdict(plan), "default_keep": default_keep, "sizes": {}, "retrieval": [],
        "transfer": base.get("transfer", {}).get("type"), "stage_names": stages_for(base),
        "size_meaning": "SAM 2 input size (transfer.image_size)" if sam2 else
        "the canvas (volume.canvas): registration has no input size of its own",
    }
    if quick:
        report["note"] = ("quick mode: " + ("tiny random networks" if sam2 else "small slabs and few k") +
                          " through the same code paths; figures are not comparable to the targets")
    if not sam2:
        report["busy_note"] = ("classic: register and fuse run in worker processes; stages_s partitions wall time "
                               "(register_fuse_wall), busy_s sums the workers' own timers, cpu_s includes the workers")
    try:
        data_used = find_data(data, work, synthetic)
        report["data"] = {k: str(v) for k, v in asdict(data_used).items()}
        _write_json(out, report)
        results: dict[int, SizeResult] = {}
        dim, index_transform = None, ""
        for size in plan.sizes:
            result, engine = bench_size(plan, size, data_used, work, models_dir, overrides, device,
                                        whole_volume=(size == plan.sizes[0]))
            dim, index_transform = engine.embedder.dim, engine.embedder.index_transform
            results[size] = result
            report["sizes"][str(size)] = result.as_dict()
            del engine
            _write_json(out, report)
        report["process_max_rss_mb_networks"] = round(max_rss_bytes() / 2**20, 1)
        report["embedding_dim"] = dim

        def keep_point(point: RetrievalPoint) -> None:
            report["retrieval"].append({k: (rounded(v) if isinstance(v, float) else v) for k, v in asdict(point).items()})
            _write_json(out, report)

        retrieval = retrieval_scale(plan.retrieval_sizes, dim, base.get("bank", {}), index_transform,
                                    plan.retrieval_queries, on_point=keep_point)
        report["targets"] = [asdict(c) for c in evaluate_targets(results, retrieval, plan.sizes[0], quick, sam2)]
        report["guide"] = guide_comparison(results)
        top_k = EngineSettings.from_settings(base).retrieval.top_k
        if sam2:
            report["recommendation"] = recommend_cpu_defaults(results, plan.per_slice_budget_s, top_k)
            report["recommendation_by_cpu_time"] = recommend_cpu_defaults(results, plan.per_slice_budget_s, top_k,
                                                                          "cpu")
        else:
            report["recommendation"] = {"reason": "no recommendation: the (image_size, k) rule is SAM 2's; choose "
                                                  "classic's k by accuracy (eval --select selection.keep=...)"}
        report["plots"] = write_plots(out, report)
        report["complete"] = True
    finally:
        if hasattr(os, "getloadavg"):
            report["environment"]["load_average_end"] = list(os.getloadavg())
        report["seconds"] = round(time.perf_counter() - started, 1)
        _write_json(out, report)
        shutil.rmtree(work, ignore_errors=True)
    logger.info("bench written to %s in %.0f s", out / "bench.json", report["seconds"])
    return report
