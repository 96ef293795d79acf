#!/usr/bin/env python
"""Corrective learning on `classic`'s fused labels, trained on the bank's own leave-one-out segmentations
(Wang, Das, Suh, Altinay, Wisse & Yushkevich, NeuroImage 2011): measured, not kept (docs/results.md, "Tried in
the 23rd session").

    python scripts/corrective_learning_dev.py cmr-bssfp 1,2,10,18,3,4,5,11 12,31,27,22,19,7,20,29 \\
        --variants pimdz:gb,pd:gbs,pd:lr,pdz:gbs,pmd:gbs

Each atlas is segmented by the others (the preset's whole pipeline), and a classifier learns, voxel by voxel
in a band around the fused labels, the true label from features of the fused result: ``p`` the fused
probabilities, ``i`` the intensity at three scales, ``m`` the intensity against each fused label's median,
``d`` the signed in-plane distance to each fused label, ``z`` the slice's place in the labels' extent. Models:
``gb`` gradient boosting (200 trees of 31 leaves), ``gbs`` a small one (50 trees of depth 3), ``lr`` logistic
regression. The query scans are then segmented with every atlas, and their labels decided before and after
the correction. The segmentations are kept in ``--cache`` (a re-run only trains and scores). The query scans
are among the scored ones: figures from here are indicative, never results.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np
from scipy import ndimage

from fewshot.config import load_preset
from fewshot.decision import LabelDecision
from fewshot.engine import Engine
from fewshot.eval.datasets import load_dataset_config
from fewshot.volume import canvas_to_label, read_label

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def features(image, probs, spacing, decision: LabelDecision, kinds: str):
    """(band, (n, F) features) of a fused result: image (Z, S, S), probs (Z, L, S, S)."""
    p = np.moveaxis(probs, 1, 0)
    chosen = decision.decide(p)
    band = ndimage.binary_dilation(chosen >= 0, structure=np.ones((1, 9, 9), bool))
    pixel, out = float(spacing[1]), []
    if "p" in kinds:
        out += [*p, 1 - p.sum(0)]
    if "i" in kinds:
        out += [image, ndimage.gaussian_filter(image, (0, 1, 1)), ndimage.gaussian_filter(image, (0, 3, 3))]
    for c in range(len(p)):
        inside = chosen == c
        if "m" in kinds:
            median = float(np.median(image[inside])) if inside.any() else 0.0
            spread = float(image[inside].std()) + 1e-3 if inside.any() else 1.0
            out.append((ndimage.gaussian_filter(image, (0, 1, 1)) - median) / spread)
        if "d" in kinds:
            outside = np.stack([ndimage.distance_transform_edt(~s) if s.any() else np.full(s.shape, 50.0) for s in inside])
            within = np.stack([ndimage.distance_transform_edt(s) for s in inside])
            out.append(np.clip((outside - within) * pixel, -30, 30))
    if "z" in kinds:
        zs = np.nonzero((chosen >= 0).any(axis=(1, 2)))[0]
        place = np.zeros(image.shape, np.float32)
        if len(zs):
            place += ((np.arange(len(image)) - zs[0]) / max(1, zs[-1] - zs[0]))[:, None, None]
        out.append(place)
    return band, np.stack([np.asarray(x, np.float32)[band] for x in out], axis=1)


def segment_all(args, cache: Path, values) -> None:
    ds = load_dataset_config(args.dataset)
    root = DATA / args.dataset
    engine, _ = Engine.from_settings(load_preset("classic", ds.overrides()), label_names=ds.labels)
    ids = args.atlases.split(",")
    for a in ids:
        engine.ingest(a, root / f"image_{a}.nii.gz", root / f"label_{a}.nii.gz")
    engine.warm()
    atlases = {i: engine.bank.atlas(i) for i in ids}
    keep = engine.config.selection.keep

    def fused(canvas, spacing, directions, use, key):
        r = engine.transfer.segment_with_atlases(canvas, spacing, use, values, keep=keep, cache_key=key, directions=directions)
        return np.stack([s.probabilities for s in r.slices])

    for i, a in atlases.items():
        others = [atlases[j] for j in ids if j != i]
        probs = fused(a.image, a.spacing, a.directions, others, f"leave-out-{i}")
        np.savez_compressed(cache / f"atlas_{i}.npz", image=a.image, probs=probs, mask=a.mask, spacing=a.spacing)
        print(f"atlas {i} segmented by the other {len(others)}", flush=True)
    for q in args.queries.split(","):
        prepared = engine.prepare(root / f"image_{q}.nii.gz")
        g = prepared.geometry
        probs = fused(prepared.canvas, g.spacing, g.directions, list(atlases.values()), prepared.key)
        truth = read_label(root / f"label_{q}.nii.gz", prepared.volume)
        np.savez_compressed(cache / f"query_{q}.npz", image=prepared.canvas, probs=probs)
        with open(cache / f"query_{q}.pkl", "wb") as f:
            pickle.dump((g, truth), f)
        print(f"query {q} segmented", flush=True)
    engine.close()


def score(variant: str, cache: Path, values, decision: LabelDecision) -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    kinds, model = variant.split(":")
    xs, ys = [], []
    for path in sorted(cache.glob("atlas_*.npz")):
        z = np.load(path)
        band, x = features(z["image"], z["probs"], z["spacing"], decision, kinds)
        truth = np.zeros(z["mask"].shape, np.int64)
        for c, v in enumerate(values):
            truth[z["mask"] == v] = c + 1
        xs.append(x)
        ys.append(truth[band])
    x, y = np.concatenate(xs), np.concatenate(ys)
    if len(x) > 400_000:
        pick = np.random.default_rng(0).choice(len(x), 400_000, replace=False)
        x, y = x[pick], y[pick]
    classifier = {"gb": lambda: HistGradientBoostingClassifier(max_iter=200, max_leaf_nodes=31, random_state=0),
                  "gbs": lambda: HistGradientBoostingClassifier(max_iter=50, max_depth=3, random_state=0),
                  "lr": lambda: LogisticRegression(max_iter=500)}[model]().fit(x, y)
    before, after = [], []
    for path in sorted(cache.glob("query_*.npz"), key=lambda p: int(p.stem.split("_")[1])):
        z = np.load(path)
        with open(path.with_suffix(".pkl"), "rb") as f:
            g, truth = pickle.load(f)
        probs = z["probs"]
        band, x = features(z["image"], probs, g.spacing, decision, kinds)
        predicted = classifier.predict_proba(x)
        corrected = np.moveaxis(probs.copy(), 1, 0)
        for c in range(len(values)):
            corrected[c][band] = predicted[:, list(classifier.classes_).index(c + 1)]
        for out, p in ((before, probs), (after, np.moveaxis(corrected, 0, 1))):
            seg = canvas_to_label(p, values, g, decision)
            out.append(np.mean([2 * float(((seg == v) & (truth == v)).sum())
                                / max(1.0, float((seg == v).sum() + (truth == v).sum())) for v in values]))
        print(f"  {variant} query {path.stem.split('_')[1]}: {before[-1]:.3f} -> {after[-1]:.3f}")
    print(f"{variant}: mean Dice {np.mean(before):.4f} -> {np.mean(after):.4f} ({100 * (np.mean(after) - np.mean(before)):+.2f})",
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset")
    p.add_argument("queries")
    p.add_argument("atlases")
    p.add_argument("--variants", default="pimdz:gb", help="comma-separated FEATURES:MODEL")
    p.add_argument("--cache", default="out/corrective-learning", help="where the segmentations are kept")
    args = p.parse_args()
    ds = load_dataset_config(args.dataset)
    values = tuple(sorted(ds.labels.values()))
    decision = LabelDecision(0.5, "threshold")  # the preset's rule
    cache = Path(args.cache) / args.dataset
    cache.mkdir(parents=True, exist_ok=True)
    if not list(cache.glob("query_*.npz")):
        segment_all(args, cache, values)
    for variant in args.variants.split(","):
        score(variant, cache, values, decision)


if __name__ == "__main__":
    main()
