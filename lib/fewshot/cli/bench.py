"""``python -m fewshot bench``: time the engine stage by stage (``fewshot.bench`` says what is timed)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fewshot.bench.plan import DEFAULT_DATASET
from fewshot.bench.report import run_bench
from fewshot.config import parse_overrides


def _int_list(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def main(args) -> int:
    report = run_bench(
        args.out, device=args.device, quick=args.quick, models_dir=args.models_dir, preset=args.preset,
        data=args.data, synthetic=args.synthetic, sizes=args.sizes, ks=args.ks,
        retrieval_sizes=args.retrieval_sizes, scale_entries=args.scale_entries,
        support_slices=args.support_slices, query_slices=args.query_slices, memory_slices=args.memory_slices, overrides=parse_overrides(args.overrides), threads=args.threads,
    )
    summary = {
        "bench": str(Path(args.out) / "bench.json"), "preset": report["preset"], "seconds": report["seconds"],
        "targets": [{k: t[k] for k in ("what", "measured", "unit", "met", "measured_cpu")} for t in report.get("targets", [])],
        "recommendation": report.get("recommendation", {}).get("reason"),
    }
    print(json.dumps(summary, indent=1))
    return 0


def add_bench_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="time the engine stage by stage; write bench.json and plots")
    p.add_argument("--out", required=True, help="output directory (bench.json, *.png)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the preset's)")
    p.add_argument("--quick", action="store_true", help="tiny random networks and small banks (CI, under a minute)")
    p.add_argument("--models-dir", default=None, help="models directory (default: $FEWSHOT_MODELS_DIR or ./models)")
    p.add_argument("--preset", default=None,
                   help="default: foundation when its weights are present, else foundation-random (random-tiny with --quick)")
    p.add_argument("--data", default=None, help=f"folder of image_N/label_N pairs (default: ../shared/data/{DEFAULT_DATASET})")
    p.add_argument("--synthetic", action="store_true", help="time synthetic volumes even when real data is present")
    p.add_argument("--sizes", type=_int_list, default=None, help="SAM 2 image sizes, e.g. 1024,512 (first = whole-volume runs)")
    p.add_argument("--ks", type=_int_list, default=None, help="supports per query slice to compare, e.g. 1,4,16")
    p.add_argument("--retrieval-sizes", type=_int_list, default=None, help="bank sizes for faiss, e.g. 1e3,1e4,1e5,1e6")
    p.add_argument("--scale-entries", type=_int_list, default=None,
                   help="bank sizes for RSS and latency of engine.segment at scale (copies of the bench's bank; "
                        "default 1e5, 0 skips)")
    p.add_argument("--support-slices", type=int, default=None,
                   help="slices of the support volume ingested for the whole-volume runs (default: all)")
    p.add_argument("--query-slices", type=int, default=None,
                   help="slices of the query volume segmented in the whole-volume runs (default: all)")
    p.add_argument("--memory-slices", type=int, default=None,
                   help="query slices per k in the cached-vs-re-encoded comparison (default 2; 0 skips it)")
    p.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: one per core)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset setting (repeatable), e.g. --set bank.approximate_above=5000")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=main)
    return p
