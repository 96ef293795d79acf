"""``python -m fewshot batch INPUT --support DATASTORE --output DIR [--address ...] [--workers N]``."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from fewshot.cli.common import add_common_options, engine_for, sync_bank
from fewshot.folders import bank_dir_for

logger = logging.getLogger(__name__)


def add_batch_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "batch", help="segment a folder or list of volumes on Ray (resumable), against one pinned bank generation",
        description="Segment many volumes on Ray workers, each holding one engine and the support bank read-only, "
                    "pinned to the bank generation read at the start. A manifest (OUTPUT/manifest.jsonl) records "
                    "every case; running again skips finished cases whose input, settings and bank are unchanged.",
    )
    p.add_argument("input", help="a folder of volumes (NIfTI, NRRD, DICOM series folders) or a text file listing them")
    p.add_argument("--support", required=True, help="MONAI Label datastore whose bank segments (images + labels/final/)")
    p.add_argument("--output", required=True, help="output folder: <case>.nii.gz + <case>.json per case, manifest.jsonl")
    p.add_argument("--bank", default=None, help="bank directory (default: <support>/.fewshot/bank-<preset>)")
    p.add_argument("--build-bank", action="store_true",
                   help="bring the bank up to date with the datastore's final labels first (this process writes it); "
                        "by default the batch only reads the bank as it is")
    p.add_argument("--only", default=None, help="comma-separated label names or values to segment (default: all)")
    p.add_argument("--address", default=None,
                   help="an existing Ray cluster (e.g. auto, ray://head:10001); default: a local Ray on this machine")
    p.add_argument("--workers", type=int, default=None, help="Ray workers, one engine each (default: CPUs // --cpus-per-worker)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each worker requests and its thread count (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs each worker requests (default 0; e.g. 0.5 shares one)")
    p.add_argument("--case-timeout", type=float, default=None, metavar="SECONDS",
                   help="a case still running after SECONDS is recorded as failed, and its worker is stopped and "
                        "replaced (default: no limit)")
    p.add_argument("--keep-older-bank", action="store_true",
                   help="keep cases finished against an older bank generation (default: segment them again, so the "
                        "whole output comes from one bank)")
    p.add_argument("--retry-failed", action="store_true",
                   help="also retry cases whose input could not be read (by default retried only once it changes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common_options(p)
    p.set_defaults(func=main)
    return p


def _warn_if_stale(bank_manifest: dict, datastore: str) -> None:
    """The batch reads the bank as it is: say so when the datastore has labels it lacks."""
    from fewshot.folders import labelled, scan_datastore
    from fewshot.files import same_content

    records = bank_manifest.get("images", {})
    stale = []
    for image_id, (image, label) in labelled(scan_datastore(datastore)).items():
        record = records.get(image_id)
        try:
            if record is None or not same_content(record.get("source", {}), "label", label):
                stale.append(image_id)
        except OSError:
            stale.append(image_id)
    if stale:
        logger.warning("the bank lacks or has an older version of %d final labels (%s%s): the batch uses the bank as "
                       "it is; pass --build-bank (or let the server ingest them) to include them",
                       len(stale), ", ".join(sorted(stale)[:5]), ", ..." if len(stale) > 5 else "")


def main(args) -> int:
    from fewshot.batch.inputs import collect
    from fewshot.batch.runner import BatchSpec, RayOptions, pin_bank, run_batch
    from fewshot.batch.worker import batch_settings
    from fewshot.config import load_preset, parse_label_map, parse_overrides

    cases = collect(args.input)
    if not cases:
        print(f"error: {args.input}: no volumes to segment", file=sys.stderr)
        return 2
    bank_dir = args.bank or str(bank_dir_for(args.support, args.preset))
    if args.build_bank:
        engine, _ = engine_for(args, args.support)
        result = sync_bank(engine, args.support)
        if result["failed"]:
            logger.warning("bank build: %d labelled images failed: %s", len(result["failed"]), result["failed"])
        bank_dir = str(engine.bank.directory)  # the one it wrote (another, when the shared one has other settings)
        del engine
    else:
        _warn_if_stale(pin_bank(bank_dir)[1], args.support)
    overrides = parse_overrides(args.overrides)
    if args.device:
        overrides["device"] = args.device
    threads = max(1, int(args.cpus_per_worker))
    spec = BatchSpec(
        settings=batch_settings(load_preset(args.preset), threads, overrides),
        bank_dir=bank_dir, output_dir=args.output, models_dir=args.models_dir,
        label_names=parse_label_map(args.labels), only=[s for s in args.only.split(",") if s] if args.only else None,
        keep_older_bank=args.keep_older_bank, retry_failed=args.retry_failed,
    )
    options = RayOptions(address=args.address, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                         gpus_per_worker=args.gpus_per_worker, verbose=args.verbose,
                         case_timeout=args.case_timeout)
    report = run_batch(cases, spec, options, progress=not args.no_progress)
    print(json.dumps(report.as_dict(), indent=1))
    if report.error:
        print(f"error: {report.error}", file=sys.stderr)
        return 2
    if report.interrupted:
        return 130
    return 1 if report.failed else 0
