#!/usr/bin/env python
"""Development pairs for the multi-atlas `classic`: segment a few query scans from a few atlases.

    python scripts/atlas_dev.py chaos-t2 2,3 1,8,10,13,15 [KEY=VALUE ...]
    python scripts/atlas_dev.py cmr-bssfp 2,6,12 3,5,7,9,4 transfer.global_affine.iterations=50
    python scripts/atlas_dev.py chaos-t2 2,3 1,8,10,13,15 --fusion '{"j222s1": {}, "maj": {"method": "majority"}}'
    python scripts/atlas_dev.py chaos-t2 2 8 --repeat 3
    python scripts/atlas_dev.py cmr-bssfp 1,2,10,18 12,31,27,22,19,7,20,29 --oracle-extent

Prints Dice per label, seconds per volume and stage timers for each query. With ``--fusion`` every
query is registered once and fused with each named variant of ``transfer.fusion`` (and decided by
each variant's ``decision`` / ``threshold``, when it names them; the registrations are cached),
which is how the fusion settings in docs/results.md were compared. ``--repeat`` segments each query
again with every registration forgotten: a registration must come out the same each time. ``--oracle-extent``
also prints the Dice each label would have if cut to the slices its reference spans, and how many slices each
label starts and ends from its reference's (negative: before it, along the file's slice axis): what the extent
still costs. These pairs were the
design set (docs/results.md, "How classic was designed"): they are also among the scored scans, so
figures from here are indicative, never results.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from fewshot.config import load_preset, parse_overrides
from fewshot.eval import metrics
from fewshot.eval.datasets import load_dataset_config
from fewshot.engine import Engine
from fewshot.volume import choose_axis, read_label

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset")
    p.add_argument("queries")
    p.add_argument("atlases")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--fusion", default=None, help="JSON: variant name -> transfer.fusion fields "
                   "(and transfer.decision / transfer.threshold)")
    p.add_argument("--repeat", type=int, default=1, help="segment each query this many times, registering "
                   "its atlases afresh each time (does a query come out the same every time?)")
    p.add_argument("--oracle-extent", action="store_true", help="also the Dice with each label cut to its "
                   "reference's slices, and where each label starts and ends against its reference")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("fewshot.bank", "fewshot.engine", "monai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ds = load_dataset_config(args.dataset)
    engine, _ = Engine.from_settings(load_preset("classic", {**ds.overrides(), **parse_overrides(args.overrides)}),
                                     label_names=ds.labels)
    root = DATA / args.dataset
    values = sorted(ds.labels.values())
    for a in args.atlases.split(","):
        engine.ingest(a, root / f"image_{a}.nii.gz", root / f"label_{a}.nii.gz")
    start = engine.warm()  # as the server and eval do before the first scan
    print(f"engine started in {sum(start.values()):.1f} s {({k: round(v, 1) for k, v in start.items()})}", flush=True)
    variants = json.loads(args.fusion) if args.fusion else {"preset": {}}
    base = engine.transfer.settings
    means: dict[str, list[float]] = {}
    try:
        for q, run in ((q, run) for q in args.queries.split(",") for run in range(args.repeat)):
            if run:
                engine.transfer.forget_caches()  # the registrations too, not only the finished segmentation
            for name, fields in variants.items():
                fields = dict(fields)
                top = {k: fields.pop(k) for k in ("decision", "threshold") if k in fields}
                engine.transfer.settings = dataclasses.replace(base, fusion=dataclasses.replace(base.fusion, **fields), **top)
                engine.forget_results()  # the finished segmentation, not the registrations
                start = time.perf_counter()
                seg = engine.segment(root / f"image_{q}.nii.gz", labels=values)
                seconds = time.perf_counter() - start
                truth = read_label(root / f"label_{q}.nii.gz", seg.volume)
                dice = {v: metrics.dice(seg.label == v, truth == v, both_empty=0.0) for v in values}
                means.setdefault(name, []).append(float(np.mean(list(dice.values()))))
                if args.oracle_extent:
                    # the engine's rule for the slice axis (the coarsest), on the file's own axes
                    oracle, ends = extent_oracle(seg.label, truth, values, choose_axis(seg.volume.spacing, "auto"))
                    means.setdefault(f"{name} (oracle extent)", []).append(float(np.mean(list(oracle.values()))))
                stages = {k: round(v, 1) for k, v in seg.timings.items() if isinstance(v, float) and v >= 0.5}
                print(f"query {q}{f' (run {run + 1})' if args.repeat > 1 else ''} {name}: Dice {({k: round(v, 3) for k, v in dice.items()})} "
                      f"mean {means[name][-1]:.3f}, {seconds:.1f} s {stages}", flush=True)
                if args.oracle_extent:
                    print(f"query {q} {name}, each label cut to its reference's slices: "
                          f"Dice {({k: round(v, 3) for k, v in oracle.items()})} mean {means[f'{name} (oracle extent)'][-1]:.3f}; "
                          f"(first, last) slice against the reference's {ends}", flush=True)
    finally:
        engine.transfer.close()
    for name, values_ in means.items():
        print(f"MEAN {name}: {np.mean(values_):.3f} over {len(values_)} queries")


def extent_oracle(label: np.ndarray, truth: np.ndarray, values, axis: int) -> tuple[dict, dict]:
    """Dice per label with the prediction cut to the slices (along ``axis``) its reference spans, and per
    label (first, last) predicted slice minus the reference's (None when either is empty)."""
    label, truth = np.moveaxis(label, axis, 0), np.moveaxis(truth, axis, 0)
    dice, ends = {}, {}
    for v in values:
        pred, ref = label == v, truth == v
        ref_z, pred_z = np.nonzero(ref.any(axis=(1, 2)))[0], np.nonzero(pred.any(axis=(1, 2)))[0]
        if len(ref_z):
            pred = pred.copy()
            pred[:ref_z[0]] = False
            pred[ref_z[-1] + 1:] = False
        dice[v] = metrics.dice(pred, ref, both_empty=0.0)
        ends[v] = ((int(pred_z[0] - ref_z[0]), int(pred_z[-1] - ref_z[-1])) if len(ref_z) and len(pred_z) else None)
    return dice, ends


if __name__ == "__main__":  # the registration workers are spawned processes: they re-import this file
    main()
