#!/usr/bin/env python
"""Joint fusion alone, on the inputs of a real query saved to disk: where its time goes.

    python scripts/fusion_profile.py dump chaos-t2 2 1,8,10,13,15 /tmp/chaos2.npz [KEY=VALUE ...]
    python scripts/fusion_profile.py time /tmp/chaos2.npz --search 1 "[1,2,2]" --repeat 2
    python scripts/fusion_profile.py time /tmp/chaos2.npz --search "[1,2,2]" --direct inf 4

``dump`` registers the atlases to the query as ``classic`` does and saves what the fusion receives
(query, registered atlas images and label probabilities, spacing). ``time`` runs the vectorised fusion
on them with the preset's fusion settings and prints seconds per stage (search, weights, votes) and in
all; with ``--direct``, the votes once per value of ``joint_fusion.DIRECT`` on the same search and weights,
and the largest difference from the first. The figures in docs/results.md ("A wider search, made the
default") came from these. Speed depends on the machine's day: compare settings within one run.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fewshot.config import load_preset, parse_overrides
from fewshot.eval.datasets import load_dataset_config
from fewshot.engine import Engine
from fewshot.transfer.atlas_settings import AtlasSettings

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def dump(args) -> None:
    import fewshot.transfer.atlas as atlas
    ds = load_dataset_config(args.dataset)
    engine, _ = Engine.from_settings(load_preset("classic", {**ds.overrides(), **parse_overrides(args.overrides)}),
                                     label_names=ds.labels)
    root = DATA / args.dataset
    for a in args.atlases.split(","):
        engine.ingest(a, root / f"image_{a}.nii.gz", root / f"label_{a}.nii.gz")
    fuse = atlas.fuse

    def saving(query, images, probabilities, spacing, settings):
        np.savez(args.out, query=query, images=images, probabilities=probabilities, spacing=np.asarray(spacing))
        print(f"saved {args.out}: query {query.shape}, {len(images)} votes", flush=True)
        return fuse(query, images, probabilities, spacing, settings)

    atlas.fuse = saving
    try:
        engine.segment(root / f"image_{args.query}.nii.gz", labels=sorted(ds.labels.values()))
    finally:
        engine.transfer.close()


def radius(text: str) -> tuple[int, int, int]:
    value = json.loads(text)
    return tuple(int(r) for r in value) if isinstance(value, list) else (int(value),) * 3


def timed(args) -> None:
    from fewshot.transfer import fusion, joint_fusion
    saved = np.load(args.inputs)
    preset = AtlasSettings.from_settings(load_preset("classic", {})["transfer"]).fusion  # validated, as the app reads it
    patch = tuple(int(r) for r in preset.patch_radius)
    hard = fusion._hard(saved["probabilities"])
    region = fusion.disagreement(hard)
    spacing = tuple(float(s) for s in saved["spacing"])
    values = np.unique(hard[:, region])
    # The preset's rule (false, true, a number of atlases, or bank) resolved as for this many votes' atlases;
    # --correlation overrides it
    by_rule = False if preset.correlation == "bank" else fusion.measure_for(preset.correlation, args.atlases)  # bank: MSQ
    correlation = args.correlation if args.correlation is not None else by_rule
    print(f"search by {'correlation' if correlation else 'mean squares'}")
    print(f"{args.inputs}: {len(hard)} votes, {int(region.sum())} voxels where they disagree, patch {patch}")
    for search in args.search:
        for run in range(args.repeat):
            cut = joint_fusion.Cut.around(saved["query"], saved["images"], hard, region, patch, radius(search), spacing)
            clock = time.perf_counter()
            stats = cut.statistics(cut.query, cut.pad, cut.size)
            best = joint_fusion.search(cut, stats, correlation)
            searched = time.perf_counter()
            chosen, weights = joint_fusion.weigh(cut, stats, best, float(preset.beta), float(preset.rho), 4096,
                                                 preset.flat_atlas_patches)
            weighed = time.perf_counter()
            first = None
            for direct in args.direct or [joint_fusion.DIRECT]:
                start = time.perf_counter()
                posteriors = joint_fusion.vote(cut, values, chosen, weights, direct=float(direct))
                voted = time.perf_counter() - start
                first = posteriors if first is None else first
                print(f"search {search} run {run + 1}: search {searched - clock:.2f} s, weights {weighed - searched:.2f} s, "
                      f"votes {voted:.2f} s (DIRECT {direct}, largest difference {np.abs(posteriors - first).max():.1e}), "
                      f"in all {searched - clock + weighed - searched + voted:.2f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump", help="save a query's fusion inputs")
    d.add_argument("dataset")
    d.add_argument("query")
    d.add_argument("atlases")
    d.add_argument("out")
    d.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    t = sub.add_parser("time", help="time the vectorised fusion on saved inputs")
    t.add_argument("inputs")
    t.add_argument("--search", nargs="+", default=["[1,2,2]"], help="search radii: N or [S,R,C]")
    t.add_argument("--repeat", type=int, default=1)
    t.add_argument("--correlation", type=lambda v: v.lower() in ("1", "true", "yes"), default=None,
                   help="search by correlation (true) or mean squares (false); default: the preset's rule")
    t.add_argument("--atlases", type=int, default=5, help="atlases the votes come from, for the preset's rule")
    t.add_argument("--direct", nargs="*", default=None, help="values of joint_fusion.DIRECT for the votes")
    args = p.parse_args()
    dump(args) if args.command == "dump" else timed(args)


if __name__ == "__main__":  # the registration workers are spawned processes: they re-import this file
    main()
