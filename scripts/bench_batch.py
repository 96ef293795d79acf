"""Measure ``python -m fewshot batch`` (issue 15's targets) on this machine; figures go to docs/bench/batch/.

    python scripts/bench_batch.py memory      # worker RSS with a 1e3- and a 1e5-entry classic bank (--cases 1: quicker)
    python scripts/bench_batch.py throughput  # cases per hour with 1 and 2 workers (1 thread each), one run
    python scripts/bench_batch.py resume      # 20 cases, Ctrl-C halfway, run again: what is redone

Real volumes from ../shared/data (CHAOS-T2 for memory, CMR for throughput, hippocampus for resume).

The large bank is built from a real one: the ``classic`` bank of two labelled CHAOS scans is copied
under new image ids until it holds the wanted number of entries. Each copy has its own
``embeddings.npy`` (the real vectors plus 1% Gaussian noise, so the faiss index is not degenerate)
and ``meta.json``; its images, masks and atlas volume are hard links to the real shard's files (the
same bytes and per-entry sizes; 1e5 entries would otherwise need ~40 GB of disk here). The manifest
is written as SupportBank writes it (same format, fingerprint and per-file sizes and sha256).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FEWSHOT_SHARED_DATA", PROJECT.parent / "shared" / "data"))
OUT = PROJECT / "docs" / "bench" / "batch"
WORK = Path(os.environ.get("BENCH_WORK", "/tmp/fewshot-bench-batch"))


def _datastore(root: Path, source: Path, labelled: list[str]) -> Path:
    (root / "labels" / "final").mkdir(parents=True, exist_ok=True)
    for case in labelled:
        shutil.copy(source / f"image_{case}.nii.gz", root / f"image_{case}.nii.gz")
        shutil.copy(source / f"label_{case}.nii.gz", root / "labels" / "final" / f"image_{case}.nii.gz")
    return root


def _settings(threads: int = 1, overrides: dict | None = None) -> dict:
    from fewshot.batch.worker import batch_settings
    from fewshot.config import load_preset

    return batch_settings(load_preset("classic"), threads, overrides)


def _build_bank(store: Path, settings: dict) -> Path:
    from fewshot.folders import bank_dir_for
    from fewshot.folders import labelled, scan_datastore
    from fewshot.engine import Engine

    bank_dir = bank_dir_for(store, "classic")
    engine, _ = Engine.from_settings(settings, bank_dir=bank_dir)
    result = engine.reconcile(labelled(scan_datastore(store)))
    assert not result["failed"], result
    return bank_dir


def replicate(template: Path, dest: Path, entries: int, seed: int = 0) -> dict:
    """A bank of about ``entries`` entries made of copies of ``template``'s shards (see the docstring)."""
    from fewshot.bench.scale import replicate_bank

    return replicate_bank(template, dest, entries, seed)


def _ray(num_cpus: int = 2):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, object_store_memory=256 << 20)
    return ray


def _disk_bytes(folder: Path) -> int:
    """Bytes of the bank as it would be without hard links (each copy counted)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def cmd_memory(args) -> dict:
    from fewshot.batch.inputs import Case
    from fewshot.batch.runner import BatchSpec, RayOptions, run_batch

    chaos = DATA / "chaos-t2"
    # Fewer atlases registered per case: the bank's effect on memory is measured, not registration time.
    settings = _settings(1, {"selection.candidates": 4, "selection.keep": 2})
    store = _datastore(WORK / "memory" / "store", chaos, ["1", "2"])
    template = _build_bank(store, settings)
    cases = [Case(f"image_{c}", str(chaos / f"image_{c}.nii.gz")) for c in ("3", "5")][: args.cases]
    _ray(2)
    rows = []
    # Two workers on the big bank show what they share (PSS); with one case there is nothing to share.
    for size, workers in ((1000, 1), (100000, 1), (100000, 2))[: 3 if len(cases) > 1 else 2]:
        bank = WORK / "memory" / f"bank-{size}"
        t0 = time.perf_counter()
        built = replicate(template, bank, size) if not (bank / "manifest.json").exists() or workers == 1 else rows[-1]["bank"]
        build_seconds = round(time.perf_counter() - t0, 1)
        output = WORK / "memory" / f"out-{size}-{workers}"
        shutil.rmtree(output, ignore_errors=True)
        report = run_batch(cases, BatchSpec(settings=settings, bank_dir=str(bank), output_dir=str(output)),
                           RayOptions(workers=workers), progress=False)
        records = [json.loads(line) for line in (output / "manifest.jsonl").read_text().splitlines()]
        cases_done = [r for r in records if r["kind"] == "case" and r["status"] == "done"]
        failures = {r["case"]: r["error"] for r in records if r["kind"] == "case" and r["status"] != "done"}
        rows.append({
            "bank": built, "bank_build_seconds": build_seconds, "workers": workers,
            "bank_bytes_without_links": _disk_bytes(bank), "failures": failures,
            "ready": report.workers,  # after loading the bank (memory figures of each worker)
            "after_cases": [{k: r.get(k) for k in ("case", "worker", "seconds", "rss_bytes", "peak_rss_bytes",
                                                   "pss_bytes", "uss_bytes")} for r in cases_done],
            "load_avg": _load(),
        })
        print(json.dumps(rows[-1], indent=1), flush=True)
    small, large = (r["after_cases"][0]["rss_bytes"] if r["after_cases"] else None for r in rows[:2])
    ratio = round(large / small, 3) if small and large else None  # the target: <= 1.2
    return {"rows": rows, "rss_after_first_case_ratio_1e5_vs_1e3": ratio,
            "settings": {"preset": "classic", "selection.candidates": 4, "selection.keep": 2, "threads": 1}}


def cmd_throughput(args) -> dict:
    from fewshot.batch.inputs import Case
    from fewshot.batch.runner import BatchSpec, RayOptions, run_batch

    cmr = DATA / "cmr-bssfp"
    settings = _settings(1)
    store = _datastore(WORK / "throughput" / "store", cmr, ["1", "2", "3"])
    bank = _build_bank(store, settings)
    queries = [p for p in sorted(cmr.glob("image_*.nii.gz")) if p.name not in {f"image_{c}.nii.gz" for c in "123"}]
    cases = [Case(p.name.removesuffix(".nii.gz"), str(p)) for p in queries[: args.cases]]
    _ray(2)
    rows = []
    for workers in (1, 2):
        output = WORK / "throughput" / f"out-{workers}"
        shutil.rmtree(output, ignore_errors=True)
        load_before = _load()  # the ratio means something only on an otherwise idle machine
        report = run_batch(cases, BatchSpec(settings=settings, bank_dir=str(bank), output_dir=str(output)),
                           RayOptions(workers=workers, cpus_per_worker=1), progress=False)
        records = [json.loads(line) for line in (output / "manifest.jsonl").read_text().splitlines()]
        seconds = [r["seconds"] for r in records if r["kind"] == "case"]
        cpu = [r["cpu_seconds"] for r in records if r["kind"] == "case"]
        rows.append({"workers": workers, "cases": report.done, "failed": report.failed,
                     "segment_seconds": report.segment_seconds, "cases_per_hour": report.cases_per_hour,
                     "run_seconds": report.seconds, "median_case_seconds": float(np.median(seconds)),
                     # On an idle machine a case's wall time is its CPU time; above it, it waited for a core.
                     "median_case_cpu_seconds": float(np.median(cpu)), "load_avg_before": load_before,
                     "load_avg": _load()})
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "ratio": round(rows[1]["cases_per_hour"] / rows[0]["cases_per_hour"], 3),
            "settings": {"preset": "classic", "atlases": 3, "threads_per_worker": 1}}


def cmd_resume(args) -> dict:
    hippo = DATA / "msd-hippocampus"
    root = WORK / "resume"
    shutil.rmtree(root, ignore_errors=True)
    store = _datastore(root / "store", hippo, ["015", "184"])
    _build_bank(store, _settings(1))
    inputs = root / "in"
    inputs.mkdir()
    for n in range(args.cases):  # 20 cases from the 5 scans: copies under their own names
        src = sorted(hippo.glob("image_*.nii.gz"))[n % 5]
        shutil.copy(src, inputs / f"case{n:02d}.nii.gz")
    output = root / "out"
    cmd = [sys.executable, "-m", "fewshot", "batch", str(inputs), "--support", str(store), "--output", str(output),
           "--preset", "classic", "--workers", "2", "--no-progress"]

    def done_lines() -> int:
        path = output / "manifest.jsonl"
        if not path.exists():
            return 0
        return sum(1 for line in path.read_text().splitlines() if '"kind": "case"' in line)

    # Like Ctrl-C in a terminal: SIGINT to the whole process group (the driver and the Ray it started).
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    while done_lines() < args.cases // 2 and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    first_out, _ = proc.communicate(timeout=300)
    first = {"exit_code": proc.returncode, "seconds": round(time.perf_counter() - t0, 1), "recorded": done_lines()}
    t0 = time.perf_counter()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    report = json.loads(second.stdout)
    records = [json.loads(line) for line in (output / "manifest.jsonl").read_text().splitlines()]
    per_case: dict[str, int] = {}
    for r in records:
        if r["kind"] == "case" and r["status"] == "done":
            per_case[r["case"]] = per_case.get(r["case"], 0) + 1
    return {"cases": args.cases, "interrupted_run": first,
            "rerun": {"exit_code": second.returncode, "seconds": round(time.perf_counter() - t0, 1),
                      "skipped": report["skipped"], "segmented": report["done"] + report["failed"],
                      "reasons": report["reasons"]},
            "segmented_twice": sorted(c for c, n in per_case.items() if n > 1),
            "all_done": len(per_case) == args.cases, "load_avg": _load()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["memory", "throughput", "resume"])
    parser.add_argument("--cases", type=int, default=None, help="throughput: 8 cases; resume: 20; memory: 2 (1: no 2-worker row)")
    parser.add_argument("--out", type=Path, default=OUT,
                        help=f"folder for <what>.json (default {OUT.relative_to(PROJECT)}; a trial run may go elsewhere)")
    args = parser.parse_args()
    args.cases = args.cases or {"throughput": 8, "resume": 20, "memory": 2}[args.what]
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.time()
    result = {"memory": cmd_memory, "throughput": cmd_throughput, "resume": cmd_resume}[args.what](args)
    result.update(command=f"python scripts/bench_batch.py {args.what} --cases {args.cases}"
                          + (f" --out {args.out}" if args.out != OUT else ""),
                  seconds=round(time.time() - started, 1), cpus=os.cpu_count(),
                  date=time.strftime("%Y-%m-%d %H:%M"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.what}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
