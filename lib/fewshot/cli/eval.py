"""``python -m fewshot eval``: run a preset on a labelled dataset under a protocol and report Dice.

Two protocols (rules in ``protocols.py``):

* ``alpnet``: the few-shot literature's 1-way 1-shot protocol. For each fold and organ, three
  support slices of the fold's support scan are encoded once (masks binarised to that organ) and
  each query slice of the organ's z-extent is segmented with its chunk's support, through the
  preset's transfer step directly (no retrieval: the protocol fixes the supports). Each organ
  keeps its own binary prediction and is scored on it alone, on its extent's slices (as
  SSL-ALPNet scores each 1-way run); Dice per scan, averaged over scans and folds. The CMR folds
  are ADNet's (SSL-ALPNet's code has none), and settings 1 and 2 coincide for an engine that is
  not trained (see ``protocols``); metrics.json says both. ``--alpnet-pairing all`` offers every
  support slice of the organ to every query slice instead (the same labels, not the protocol's
  pairing: its own row).
* ``clinical``: the tool's real use. ``--shots`` scans are ingested into an in-memory bank and
  every other scan is segmented whole with all labels through ``Engine.segment``; every slice is
  scored, so false positives on organ-free slices count. Dice and HD95 per label per scan.

``--growth`` adds a curve of Dice against the number of labelled scans (1, 2, 4, 8): one fixed
query set, one fixed candidate pool, scans added in the order the ``bank_coverage`` strategy
proposes (``coverage.propose``) versus random orders (3 seeds). It is scored the clinical way.

``--select KEY=V1,V2,...`` tunes honestly: every point of the grid is evaluated, and each fold
(clinical: each of 5 groups of query scans) is reported at the point with the best mean Dice on the
OTHER folds (nested selection); the headline figures are those nested ones.

OUT also gets ``folds.csv`` / ``folds.md`` (support scan, query scans and support slices per fold).
HD95 is undefined when a prediction is empty; the count of such cases is reported beside each mean,
and ``--hd95-empty diagonal`` counts them at the scan's diagonal instead of leaving them out.

Scoring happens on the native voxel grid, reoriented to RAS with the slicing axis first so that
slice indices are the canvas's, with the volume's own spacing for HD95 (mm).

A dataset file ``configs/datasets/<name>.yaml`` (picked by ``--dataset`` or by the data folder's
name) supplies label names and volume settings that suit the dataset, e.g. a finer canvas
spacing for the tiny hippocampus crops. Precedence: preset < dataset file < ``--set``.
"""
from __future__ import annotations

import argparse
import json

from fewshot.cli.common import add_common_options
from fewshot.eval import protocols
from fewshot.eval.alpnet import ALPNET_PAIRINGS, ALPNET_SUPPORTS
from fewshot.eval.growth import RANDOM_SEEDS
from fewshot.eval.plan import PROTOCOLS
from fewshot.eval.results import HD95_EMPTY, json_safe
from fewshot.eval.runner import run_eval


def main(args) -> int:
    report = run_eval(
        args.data, args.protocol, args.preset, args.out, labels=args.labels, folds=args.folds, shots=args.shots,
        growth=args.growth, growth_steps=args.growth_steps, models_dir=args.models_dir, overrides=args.overrides,
        max_queries=args.max_queries, dataset=args.dataset, seed=args.seed, device=args.device, chunks=args.chunks,
        fold_convention=args.fold_convention, select=args.select, hd95_empty=args.hd95_empty,
        alpnet_support=args.alpnet_support, alpnet_pairing=args.alpnet_pairing, growth_random=args.growth_random,
    )
    m = report.metrics
    summary = {
        "protocol": m["protocol"], "preset": m["preset"], "mean_dice": m["mean_dice"],
        "per_label": {k: {"dice_mean": v["dice_mean"], "dice_std": v["dice_std"], "n": v["n"],
                          "hd95_mean": v["hd95_mean"], "hd95_empty_prediction": v["hd95_empty_prediction"]}
                      for k, v in m["per_label"].items()},
        "nested_selection": [g["chosen"] for g in m["selection"]["per_group"]] if m["selection"] else None,
        "wall_seconds_per_query_slice": m["timing"]["wall_seconds_per_query_slice"],
        "wall_seconds_per_volume": m["timing"].get("wall_seconds_per_volume"),
        "out": str(report.out_dir),
    }
    print(json.dumps(json_safe(summary), indent=1))
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("growth steps must be positive integers")
    return values


def add_eval_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="Dice (and HD95) of a preset on a labelled dataset, under the alpnet or clinical protocol",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="folder of image_N / label_N pairs (NIfTI)")
    p.add_argument("--protocol", required=True, choices=PROTOCOLS)
    p.add_argument("--out", required=True, help="output folder for metrics.json, cases.csv and PNG plots")
    p.add_argument("--dataset", default=None,
                   help="configs/datasets/<name>.yaml to apply (default: the one named like the data folder; "
                        "'none' for none)")
    p.add_argument("--folds", type=int, default=None,
                   help="alpnet: cross-validation folds (default 5); clinical: random support draws (default 1)")
    p.add_argument("--shots", type=int, default=1, help="clinical: labelled scans in the support bank (default 1)")
    p.add_argument("--growth", action="store_true",
                   help="also draw Dice against 1, 2, 4, 8 labelled scans: bank_coverage order vs random orders")
    p.add_argument("--growth-steps", type=_int_list, default=protocols.GROWTH_STEPS, metavar="N,N,...",
                   help="labelled-scan counts of the growth curve (default 1,2,4,8)")
    p.add_argument("--growth-random", type=int, default=RANDOM_SEEDS, metavar="N",
                   help=f"random orders drawn beside the bank_coverage order (default {RANDOM_SEEDS}; 0: coverage only)")
    p.add_argument("--max-queries", type=int, default=None, help="query scans per fold at most (quick runs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the clinical and growth splits (default 0)")
    p.add_argument("--chunks", type=int, default=3, help="alpnet: chunks of the organ's z-extent (default 3)")
    p.add_argument("--alpnet-support", default="slices", choices=tuple(ALPNET_SUPPORTS),
                   help="alpnet: the protocol's fixed support slices (default); those slices carried through the "
                        "support scan's own unlabelled slices, which then serves as one atlas (propagated: no "
                        "other label is read); or the support scan's whole labelled volume (not the protocol: "
                        "report it as its own row)")
    p.add_argument("--alpnet-pairing", default="chunk", choices=tuple(ALPNET_PAIRINGS),
                   help="alpnet with the fixed support slices: each query slice with its chunk's support slice (the "
                        "protocol's rule, default), or with every support slice of the organ (all: the same labels, "
                        "not the protocol's pairing; report it as its own row)")
    p.add_argument("--fold-convention", default="alpnet", choices=("alpnet", "adnet"),
                   help="alpnet: which scan supports each fold (SSL-ALPNet's or ADNet's rule)")
    p.add_argument("--select", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="tune a preset setting honestly (repeatable; the grid is every combination): every grid "
                        "point is evaluated, and each fold (clinical: each of 5 groups of query scans) is reported "
                        "at the point with the best mean Dice on the OTHER folds. E.g. "
                        "--select embedder.pca_dims=16,32,64")
    p.add_argument("--hd95-empty", default="exclude", choices=tuple(HD95_EMPTY),
                   help="HD95 of a case whose prediction (or reference) is empty: exclude it from the mean and "
                        "count it (default), or count it at the scan's diagonal in mm")
    add_common_options(p)
    p.set_defaults(func=main)
    return p
