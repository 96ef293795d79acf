#!/usr/bin/env python
"""Joint fusion's search by correlation against ANTs, on the inputs of a real query saved to disk.

    python scripts/fusion_profile.py dump cmr-bssfp 2 3,5 /tmp/cmr2.npz
    python scripts/correlation_vs_ants.py /tmp/cmr2.npz --centres 3000

Two checks, for each measure (mean squares, correlation):

1. **Fused labels.** The vectorised fusion (``implementation: vectorised``) and antsJointFusion
   (``implementation: ants``) on the same inputs with the preset's other fusion settings, the vectorised one
   with each rule for a flat atlas patch (``flat_atlas_patches``: the preset's ``centred``, and ``ants``):
   where their labels differ within the fused region, and how many of those voxels lie within a patch of an
   atlas's zero fill.
2. **The search alone.** At ``--centres`` sampled centres of the region, each atlas's best offset found by
   brute force, the way ANTs searches (``WeightedVotingFusionImageFilter``: the query patch normalised, in
   float64 and again rounded to float32 as ANTs stores it; the raw atlas patch; strict ``<`` over the offsets
   nearest first; the atlas patch's variance floored at 1e-6, as ANTs did before 2022 and the vectorised
   search does, where ANTs now scores a variance up to machine epsilon 0 and floors none), against
   ``joint_fusion.search``'s choice there.

Patches one slice thick only (the preset's). Written for the 26th session's question: by correlation the
labels differed from antsJointFusion's on real cardiac atlases where by mean squares they did not. The
answer (27th session): the search is the same; the weights differ where an atlas's chosen patch is flat
(zero fill), which the search by correlation lands on more often (a flat patch scores 0, which beats every
anticorrelated one). With ANTs' rule for it the labels agree at every voxel by either measure
(docs/results.md, "Joint fusion's search by correlation").
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
from scipy import ndimage

from fewshot.config import load_preset
from fewshot.transfer import joint_fusion
from fewshot.transfer.atlas_settings import AtlasSettings
from fewshot.transfer.fusion import FusionSettings, _hard, disagreement, joint


def preset_fusion() -> FusionSettings:
    return AtlasSettings.from_settings(load_preset("classic", {})["transfer"]).fusion


def labels_of(posteriors: np.ndarray) -> np.ndarray:
    return np.where(posteriors.max(0) > 0.5, posteriors.argmax(0) + 1, 0)


def fused_labels(saved, settings: FusionSettings, region: np.ndarray, near_zero_fill: np.ndarray) -> None:
    for correlation in (False, True):
        s = replace(settings, correlation=correlation)
        args = (saved["query"], saved["images"], saved["probabilities"], tuple(saved["spacing"]))
        ants = joint(*args, replace(s, implementation="ants"))
        for rule in ("centred", "ants"):
            ours = joint(*args, replace(s, implementation="vectorised", flat_atlas_patches=rule))
            differ = (labels_of(ours) != labels_of(ants)) & region
            print(f"{'correlation' if correlation else 'mean squares'}, flat atlas patches {rule}: labels differ at "
                  f"{int(differ.sum())} of {int(region.sum())} fused voxels ({differ.sum() / region.sum():.3%}); "
                  f"{int((differ & near_zero_fill).sum())} of them within a patch of an atlas's zero fill; mean "
                  f"posterior difference {np.abs(ours - ants)[:, region].mean():.2e}", flush=True)


def brute_force(cut: joint_fusion.Cut, centres: np.ndarray, correlation: bool, store) -> np.ndarray:
    """(K, n) best offsets at ``centres`` (box coordinates), ANTs' published search; ``store``: the dtype the
    normalised query patch is kept in."""
    q, atlases, inside = cut.query.numpy(), cut.images.numpy(), cut.inside.numpy()
    ry, rx = int(cut.patch[1]), int(cut.patch[2])
    py, px = np.meshgrid(np.arange(-ry, ry + 1), np.arange(-rx, rx + 1), indexing="ij")
    chosen = np.zeros((len(atlases), len(centres)), np.int64)
    for n, centre in enumerate(centres):
        z, y, x = centre + cut.pad
        patch_q, ok = q[z, y + py, x + px].ravel(), inside[z, y + py, x + px].ravel()
        values = patch_q[ok]
        mean = values.mean()
        std = np.sqrt(max((values @ values - len(values) * mean * mean) / (len(values) - 1), 0.0))
        normalised = ((patch_q - mean) / std).astype(store).astype(np.float64) if std > 0 else np.full_like(patch_q, np.nan)
        for i, atlas in enumerate(atlases):
            best, best_j = np.inf, 0
            for j, (dz, dy, dx) in enumerate(cut.offsets):
                if not inside[z + dz, y + dy, x + dx]:
                    continue
                pairs = ok & inside[z + dz, y + dy + py, x + dx + px].ravel()
                if correlation:  # a flat query patch normalises to NaN: no pair counts (mean squares: raw)
                    pairs &= np.isfinite(normalised)
                if pairs.sum() < 3:
                    continue
                a = atlas[z + dz, y + dy + py, x + dx + px].ravel()[pairs].astype(np.float64)
                if correlation:
                    sxy = a @ normalised[pairs]
                    measure = sxy * sxy / max(a @ a - a.sum() ** 2 / pairs.sum(), 1e-6)
                    score = -measure if sxy > 0 else measure
                else:
                    score = ((patch_q[pairs] - a) ** 2).mean()
                if score < best:
                    best, best_j = score, j
            chosen[i, n] = best_j
    return chosen


def search_alone(saved, settings: FusionSettings, region: np.ndarray, n_centres: int, seed: int) -> None:
    hard = _hard(saved["probabilities"])
    cut = joint_fusion.Cut.around(saved["query"].astype(np.float32), saved["images"].astype(np.float32), hard, region,
                                  settings.patch_radius, settings.search_radius, tuple(saved["spacing"]))
    if cut.patch[0] != 0:
        raise SystemExit("the brute force is written for patches one slice thick")
    stats = cut.statistics(cut.query, cut.pad, cut.size)
    centres = cut.centres.numpy()
    sample = centres[np.random.default_rng(seed).choice(len(centres), min(n_centres, len(centres)), replace=False)]
    for correlation in (False, True):
        ours = joint_fusion.search(cut, stats, correlation).numpy()[(slice(None),) + tuple(sample.T)]
        clock = time.perf_counter()
        for store in ((np.float64, np.float32) if correlation else (np.float64,)):
            theirs = brute_force(cut, sample, correlation, store)
            print(f"{'correlation' if correlation else 'mean squares'}, query patch kept in {store.__name__}: the "
                  f"search's offset differs from the brute force at {(ours != theirs).mean():.3%} of "
                  f"{theirs.size} (atlas, centre) pairs ({time.perf_counter() - clock:.0f} s)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", help="a fusion_profile.py dump")
    p.add_argument("--centres", type=int, default=3000, help="centres sampled for the brute-force search")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    saved = np.load(args.inputs)
    settings = preset_fusion()
    region = disagreement(_hard(saved["probabilities"]))
    patch = tuple(2 * int(r) + 1 for r in settings.patch_radius)
    near_zero_fill = ndimage.binary_dilation((saved["images"] == 0).any(0), structure=np.ones(patch, bool))
    fused_labels(saved, settings, region, near_zero_fill)
    search_alone(saved, settings, region, args.centres, args.seed)


if __name__ == "__main__":
    main()
