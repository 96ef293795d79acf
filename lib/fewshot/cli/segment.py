"""``python -m fewshot segment``: one volume, segmented from a datastore's labelled images."""
from __future__ import annotations

import argparse
import json
import os

from fewshot.cli.common import add_common_options, engine_for, progress_bar, sync_bank


def add_segment_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("segment", help="segment a volume from a datastore's labelled images")
    p.add_argument("--image", required=True, help="volume to segment (NIfTI, NRRD, DICOM folder, ...)")
    p.add_argument("--support", required=True, help="MONAI Label datastore: images + labels/final/")
    p.add_argument("--output", required=True, help="output label file (.nii.gz); a .json sidecar goes beside it")
    p.add_argument("--bank", default=None, help="bank directory (default: <support>/.fewshot/bank-<preset>)")
    p.add_argument("--only", default=None, help="comma-separated label names or values to segment (default: all)")
    add_common_options(p)
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    from fewshot.volume import VolumeError

    # Said before the networks load and the bank syncs with the datastore, which take a minute on a busy CPU.
    if not os.path.exists(args.image):
        raise VolumeError(f"{args.image}: no such file")
    engine, _ = engine_for(args, args.support)
    sync_bank(engine, args.support)
    requested = [s for s in args.only.split(",") if s] if args.only else None
    # Progress counts slices, or for a multi-atlas preset atlases aligned and registered, then fusion.
    unit = "step" if engine.scan_level else "slice"
    seg = engine.segment(args.image, labels=requested, progress=progress_bar("segmenting", unit))
    sidecar = seg.save(args.output)
    summary = {k: v for k, v in seg.summary().items() if k != "provenance"}
    summary["seconds_per_volume"] = round(float(seg.timings.get("total", 0.0)), 2)
    summary["output"] = str(args.output)
    summary["sidecar"] = str(sidecar)
    print(json.dumps(summary, indent=1))
    return 0
