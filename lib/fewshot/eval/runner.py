"""``python -m fewshot eval``: run a preset on a labelled dataset under a protocol and report Dice.

Two protocols (rules in ``protocols.py``):

* ``alpnet``: the few-shot literature's 1-way 1-shot protocol. For each fold and organ, three
  support slices of the fold's support scan are encoded once (masks binarised to that organ) and
  each query slice of the organ's z-extent is segmented with its chunk's support, through the
  preset's transfer step directly (no retrieval: the protocol fixes the supports). Each organ
  keeps its own binary prediction and is scored on it alone, on its extent's slices (as
  SSL-ALPNet scores each 1-way run); Dice per scan, averaged over scans and folds. The CMR folds
  are ADNet's (SSL-ALPNet's code has none), and settings 1 and 2 coincide for an engine that is
  not trained (see ``protocols``); metrics.json says both.
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

import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import yaml

from fewshot.config import CONFIGS_DIR, ConfigError, parse_label_map, parse_overrides
from fewshot.eval import protocols
from fewshot.eval.metrics import LabelScore, dice, hd95
from fewshot.meters import cpu_seconds

logger = logging.getLogger(__name__)

PROTOCOLS = ("alpnet", "clinical")
RANDOM_SEEDS = 3  # random orders averaged on the growth curve
MONTAGE_CASES = 2  # best and worst cases each shown in the overlay montage


# ------------------------------------------------------------------------------------ datasets


@dataclass
class DatasetConfig:
    """``configs/datasets/<name>.yaml``: label names and settings that suit one dataset."""

    name: str
    description: str = ""
    labels: dict[str, int] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # deep-merged over the preset (dotted-flattened)
    folds: str = ""  # where the alpnet folds come from for this dataset, recorded in metrics.json

    def overrides(self) -> dict:
        return _flatten(self.settings)


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def available_datasets() -> list[str]:
    return sorted(p.stem for p in (CONFIGS_DIR / "datasets").glob("*.yaml"))


def load_dataset_config(name: str) -> DatasetConfig:
    path = CONFIGS_DIR / "datasets" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown dataset {name!r}; available: {', '.join(available_datasets()) or 'none'}")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping")
    unknown = set(raw) - {"description", "labels", "settings", "folds"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)} (use description, labels, settings, folds)")
    return DatasetConfig(name=name, description=str(raw.get("description", "")),
                         labels=parse_label_map(raw.get("labels")), settings=dict(raw.get("settings") or {}),
                         folds=" ".join(str(raw.get("folds", "")).split()))


def dataset_for(data_dir: str | Path, name: str | None) -> DatasetConfig | None:
    """The dataset file named by ``name``; without one, the file named like the data folder, if any."""
    if name == "none":
        return None
    if name:
        return load_dataset_config(name)
    folder = Path(data_dir).resolve().name
    if folder in available_datasets():
        logger.info("using dataset settings configs/datasets/%s.yaml (pass --dataset none to ignore)", folder)
        return load_dataset_config(folder)
    return None


# ------------------------------------------------------------------------------------ scans


@dataclass(frozen=True)
class Case:
    case_id: str
    image: str
    label: str


@dataclass
class Reference:
    """A scan's image and reference label on the native grid, slicing axis first (RAS order)."""

    image: np.ndarray  # (Z, H, W) float32
    label: np.ndarray  # (Z, H, W) uint16
    spacing: tuple[float, float, float]  # mm along (Z, H, W)


def slice_major(array: np.ndarray, affine: np.ndarray, axis: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """File-order array -> RAS with ``axis`` (the canvas's slicing axis) first, and its spacing.

    Uses the same reorientation as the canvas, so index z here is canvas slice z.
    """
    from fewshot.volume import to_ras

    ras, _, spacing_ras = to_ras(array, affine)
    spacing = (spacing_ras[axis],) + tuple(s for i, s in enumerate(spacing_ras) if i != axis)
    return np.moveaxis(ras, axis, 0), tuple(float(s) for s in spacing)


def label_values_in(cases: Sequence[Case]) -> list[int]:
    import nibabel as nib

    values: set[int] = set()
    for case in cases:
        values.update(int(v) for v in np.unique(np.asarray(nib.load(case.label).dataobj)) if v)
    return sorted(values)


# ------------------------------------------------------------------------------------ results


@dataclass
class Preview:
    """The middle reference slice of a case, for the overlay montage (display orientation)."""

    slice_index: int
    image: np.ndarray
    truth: np.ndarray
    prediction: np.ndarray


@dataclass
class CaseResult:
    """One query scan segmented in one fold."""

    case_id: str
    fold: int
    support_ids: tuple[str, ...]
    scores: dict[int, LabelScore]
    scored_slices: dict[int, int]  # label -> slices scored
    reference_voxels: dict[int, int]
    predicted_voxels: dict[int, int]  # within the scored slices
    seconds: float  # wall time segmenting this scan (all its labels)
    query_slices: int  # distinct slices of the scan segmented (for at least one label)
    organ_slices: int  # (slice, label) pairs segmented: alpnet's 1-way runs summed; clinical slices x labels
    cpu_seconds: float = math.nan  # CPU time of this process and its worker processes over the same span
    stage_seconds: dict[str, float] = field(default_factory=dict)  # the transfer's stage timers (see timing_summary)
    diagonal_mm: float = math.nan  # the scan's diagonal, the HD95 stand-in for an empty prediction when asked
    preview: Preview | None = None

    def mean_dice(self) -> float:
        values = [s.dice for s in self.scores.values() if math.isfinite(s.dice)]
        return float(np.mean(values)) if values else math.nan


def _display(slice2d: np.ndarray) -> np.ndarray:
    # RAS in-plane axes (first, second) -> rows, columns with the second axis pointing up.
    return np.flipud(np.asarray(slice2d).T)


def combined_map(predictions: Mapping[int, np.ndarray], shape) -> np.ndarray:
    """One label map from per-label binary predictions, for display only (never scored): where 1-way
    predictions overlap, the label painted last (the higher value) is shown."""
    out = np.zeros(shape, np.uint16)
    for value in sorted(predictions):
        out[predictions[value]] = value
    return out


def make_preview(ref: Reference, prediction: np.ndarray, labels: Sequence[int]) -> Preview | None:
    inside = np.isin(ref.label, list(labels)).any(axis=(1, 2))
    zs = np.flatnonzero(inside)
    if not len(zs):
        return None
    z = int(zs[len(zs) // 2])
    return Preview(z, _display(ref.image[z]), _display(ref.label[z]), _display(prediction[z]))


def _finite(values) -> np.ndarray:
    arr = np.asarray([float(v) for v in values], dtype=float)
    return arr[np.isfinite(arr)]


def _stats(values) -> tuple[float, float, int]:
    arr = _finite(values)
    if not arr.size:
        return math.nan, math.nan, 0
    return float(arr.mean()), float(arr.std()), int(arr.size)


def json_safe(obj):
    """NaN/inf -> null and numpy scalars -> Python, so metrics.json is strict JSON."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    return obj


# ------------------------------------------------------------------------------------ the run


@dataclass
class EvalReport:
    metrics: dict
    out_dir: Path
    files: dict[str, Path]


@dataclass
class WholeScanRun:
    """One query scan segmented whole by the engine, with its reference, on the slicing-axis-first grid."""

    reference: Reference
    prediction: np.ndarray  # (Z, H, W) label map
    slices: int  # canvas slices segmented
    labels_segmented: int  # labels the engine segmented (others skipped: no example in the bank)
    seconds: float  # wall time of engine.segment
    cpu: float  # CPU time of this process and its workers over the same span
    stages: dict[str, float]  # the engine's stage timers


class EvalRun:
    """One evaluation: an engine, the dataset's scans and label map, and what has been measured."""

    def __init__(self, engine, cases: Sequence[Case], labels: Mapping[str, int], max_queries: int | None = None,
                 seed: int = 0):
        self.engine = engine
        self.cases = {c.case_id: c for c in cases}
        self.labels = dict(labels)  # name -> value, the labels evaluated
        self.values = sorted(self.labels.values())
        self.name_of = {v: n for n, v in self.labels.items()}
        self.max_queries = max_queries
        self.seed = seed
        self._references: dict[str, tuple[object, Reference]] = {}

    # -------------------------------------------------------------- helpers

    def _queries(self, ids: Sequence[str]) -> list[str]:
        ids = list(ids)
        return ids[: self.max_queries] if self.max_queries else ids

    def reference(self, case_id: str, prepared) -> Reference:
        case = self.cases[case_id]
        from fewshot.volume import read_label

        label = read_label(case.label, prepared.volume)
        axis = prepared.geometry.axis
        image, spacing = slice_major(prepared.volume.array, prepared.volume.affine, axis)
        label_sm, _ = slice_major(label, prepared.volume.affine, axis)
        return Reference(image=image.astype(np.float32), label=label_sm.astype(np.uint16), spacing=spacing)

    def _score(self, case_id: str, fold: int, support_ids, ref: Reference, predictions: Mapping[int, np.ndarray],
               labels: Sequence[int], slices: Mapping[int, Sequence[int]] | None, both_empty: float,
               seconds: float, query_slices: int, organ_slices: int, stages: Mapping[str, float],
               cpu: float = math.nan, display: np.ndarray | None = None) -> CaseResult:
        """Each label is scored on its OWN binary prediction (``predictions``: value -> bool (Z, H, W)),
        restricted to ``slices[value]`` when given; ``display`` is only shown in the montage."""
        n_slices = len(ref.label)
        scores, scored, ref_vox, pred_vox = {}, {}, {}, {}
        for v in labels:
            zs = list(slices[v]) if slices is not None else list(range(n_slices))
            p, t = predictions[v][zs], ref.label[zs] == v
            scores[v] = LabelScore(dice=dice(p, t, both_empty=both_empty), hd95=hd95(p, t, ref.spacing))
            scored[v], ref_vox[v], pred_vox[v] = len(zs), int(t.sum()), int(p.sum())
        if display is None:
            display = combined_map({v: predictions[v] for v in labels}, ref.label.shape)
        diagonal = float(np.sqrt(sum((n * sp) ** 2 for n, sp in zip(ref.label.shape, ref.spacing))))
        result = CaseResult(
            case_id=case_id, fold=fold, support_ids=tuple(support_ids), scores=scores, scored_slices=scored,
            reference_voxels=ref_vox, predicted_voxels=pred_vox, seconds=seconds, query_slices=query_slices,
            organ_slices=organ_slices, cpu_seconds=cpu, stage_seconds=dict(stages), diagonal_mm=diagonal,
            preview=make_preview(ref, display, labels),
        )
        logger.info("%s, case %s: %s (%.1f s)", f"fold {fold}" if fold >= 0 else "growth curve", case_id,
                    ", ".join(f"{self.name_of.get(v, v)} Dice {s.dice:.3f}" for v, s in scores.items()), seconds)
        return result

    # -------------------------------------------------------------- alpnet

    def alpnet_supports(self, support_id: str, n_chunks: int) -> tuple[dict[int, list[list]], dict[int, list[int]]]:
        """organ -> per chunk, the candidate Supports of its one slice (encoded once, mask binarised to
        the organ), and their slices. The preset's own path: with ``bank.augmentations_per_slice`` the
        candidates are the slice and its augmented copies (affine on image and mask, colour jitter on
        the image), among which the matcher picks per query slice, as the bank does for a clinical run."""
        import hashlib

        from fewshot.match.augment import augment_support
        from fewshot.types import Support, SupportRef
        from fewshot.volume import label_to_canvas, read_label

        bank_settings = self.engine.settings.get("bank", {})
        n_aug = int(bank_settings.get("augmentations_per_slice", 0))
        aug_params = bank_settings.get("augmentation", {})

        case = self.cases[support_id]
        prepared = self.engine.prepare(case.image)
        masks = label_to_canvas(read_label(case.label, prepared.volume), prepared.geometry)
        supports, slices = {}, {}
        for organ in self.values:
            # Canvas presence: a support slice must hold the organ after resampling to the canvas.
            presence = (masks == organ).any(axis=(1, 2))
            if not presence.any():
                logger.warning("support scan %s has no %s: that organ is not evaluated in this fold",
                               support_id, self.name_of[organ])
                continue
            zs = protocols.support_slice_per_chunk(protocols.organ_chunks(presence, n_chunks))
            images, binary, refs, chunk_of = [], [], [], []
            for chunk, z in enumerate(zs):
                mask = np.where(masks[z] == organ, organ, 0).astype(np.uint16)
                copies = [(prepared.canvas[z], mask, "")]
                digest = hashlib.sha256(f"{aug_params.get('seed', 0)}:{support_id}:{organ}:{z}".encode()).digest()
                rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))  # the same copies every run
                copies += [(a.image, a.mask, a.description) for a in augment_support(prepared.canvas[z], mask, n_aug, aug_params, rng)]
                for image, copy_mask, description in copies:
                    images.append(image)
                    binary.append(copy_mask)
                    refs.append(SupportRef(support_id, int(z), augmentation=description))
                    chunk_of.append(chunk)
            payload = self.engine.transfer.encode_supports(np.stack(images), np.stack(binary), [organ])
            supports[organ] = [[] for _ in zs]
            for e, (ref, chunk) in enumerate(zip(refs, chunk_of)):
                supports[organ][chunk].append(
                    Support(ref=ref, image=images[e], mask=binary[e], labels=(organ,) if binary[e].any() else (),
                            payload={k: v[e] for k, v in payload.items()}))
            slices[organ] = [int(z) for z in zs]
        return supports, slices

    def alpnet_chosen(self, query_slice: np.ndarray, candidates: list) -> list:
        """The chunk's candidates this query slice attends to: the matcher's ``selection.keep`` best
        (LPIPS over the augmented copies for the SAM 2 presets), or all of them without a matcher."""
        keep = int(self.engine.settings.get("selection", {}).get("keep", 4))
        if self.engine.matcher is None or len(candidates) <= keep:
            return candidates
        distances = self.engine.matcher.distances(query_slice, np.stack([c.image for c in candidates]))
        return [candidates[i] for i in np.argsort(distances, kind="stable")[:keep]]

    def alpnet_query(self, fold: int, support_id: str, query_id: str, supports: Mapping[int, list],
                     n_chunks: int) -> CaseResult:
        from fewshot.types import SlicePlan
        from fewshot.volume import canvas_to_label

        start, cpu_start = time.perf_counter(), cpu_seconds()
        prepared = self.engine.prepare(self.cases[query_id].image)
        ref = self.reference(query_id, prepared)
        n = len(prepared.canvas)
        # One binary prediction per organ, as SSL-ALPNet scores 1-way runs: a shared label map would let
        # a later organ overwrite an earlier one's true positives where they overlap (LV-BP vs LV-MYO).
        predictions: dict[int, np.ndarray] = {}
        extents, stages = {}, {}
        evaluated = []
        for organ, organ_supports in supports.items():
            presence = protocols.label_presence(ref.label, organ, axis=0)
            if not presence.any():
                logger.info("case %s has no %s: not scored for it", query_id, self.name_of[organ])
                continue
            # The query's own reference extent decides the chunks (an oracle the protocol grants).
            chunk_of = protocols.query_chunk_assignment(presence, n_chunks)
            plans = [SlicePlan(z, self.alpnet_chosen(prepared.canvas[z], organ_supports[chunk_of[z]]), (organ,))
                     if z in chunk_of else SlicePlan(z, [], ()) for z in range(n)]
            result = self.engine.transfer.segment_volume(prepared.canvas, plans, [organ], cache_key=prepared.key)
            probs = np.stack([s.probabilities for s in result.slices])
            native = canvas_to_label(probs, [organ], prepared.geometry)
            organ_pred, _ = slice_major(native, prepared.volume.affine, prepared.geometry.axis)
            predictions[organ] = organ_pred == organ
            extents[organ] = protocols.organ_extent(presence)
            evaluated.append(organ)
            for stage, sec in result.seconds.items():
                stages[stage] = stages.get(stage, 0.0) + sec
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
        query_slices = len(set().union(*map(set, extents.values()))) if extents else 0
        organ_slices = sum(len(zs) for zs in extents.values())
        # 1-way: each organ is scored against its own prediction only, on its own extent.
        return self._score(query_id, fold, (support_id,), ref, predictions, evaluated, extents, 1.0,
                           seconds, query_slices, organ_slices, stages, cpu)

    def alpnet_query_volume(self, fold: int, support_id: str, query_id: str) -> CaseResult:
        """The same folds and scoring as ``alpnet_query``, but segmented from the support scan's whole
        labelled volume (the bank holds it, the engine's own path runs): not the protocol's fixed support
        slices, so reported as its own row. Each organ is still scored on its own reference extent."""
        run = self.segment_whole(query_id)
        ref, prediction = run.reference, run.prediction
        extents = {}
        for organ in self.values:
            presence = protocols.label_presence(ref.label, organ, axis=0)
            if presence.any() and organ in self.engine.bank.label_values:
                extents[organ] = protocols.organ_extent(presence)
        query_slices = len(set().union(*map(set, extents.values()))) if extents else 0
        return self._score(query_id, fold, (support_id,), ref, {v: prediction == v for v in extents}, list(extents),
                           extents, 1.0, run.seconds, query_slices, sum(len(z) for z in extents.values()), run.stages,
                           run.cpu, display=prediction)

    def run_alpnet(self, n_folds: int, n_chunks: int = 3, convention: str = "alpnet",
                   support: str = "slices") -> tuple[list[CaseResult], list[dict]]:
        """``support``: "slices" (the protocol: one support slice per chunk of each organ) or "volume"
        (the support scan's whole labelled volume, for methods that need it; reported apart)."""
        folds = protocols.alpnet_folds(list(self.cases), n_folds, convention)
        results, fold_info = [], []
        jobs = sum(len(self._queries(f.query_ids)) for f in folds)
        with _progress(jobs, "alpnet queries") as bar:
            for fold in folds:
                logger.info("fold %d: support scan %s, queries %s", fold.index, fold.support_id, list(fold.query_ids))
                queries = self._queries(fold.query_ids)
                if support == "volume":
                    self.clear_bank()
                    case = self.cases[fold.support_id]
                    self.engine.ingest(fold.support_id, case.image, case.label)
                    for query_id in queries:
                        results.append(self.alpnet_query_volume(fold.index, fold.support_id, query_id))
                        bar.update(1)
                    fold_info.append({"index": fold.index, "support_ids": [fold.support_id], "query_ids": queries,
                                      "support_slices": {self.name_of[v]: "whole volume" for v in self.values}})
                    continue
                supports, slices = self.alpnet_supports(fold.support_id, n_chunks)
                for query_id in queries:
                    results.append(self.alpnet_query(fold.index, fold.support_id, query_id, supports, n_chunks))
                    bar.update(1)
                fold_info.append({
                    "index": fold.index, "support_ids": [fold.support_id], "query_ids": queries,
                    "support_slices": {self.name_of[o]: z for o, z in slices.items()},
                })
        if support == "volume":
            self.clear_bank()
        return results, fold_info

    # -------------------------------------------------------------- clinical

    def clear_bank(self) -> None:
        for image_id in self.engine.bank.image_ids():
            self.engine.remove(image_id)

    def segment_whole(self, query_id: str) -> "WholeScanRun":
        """The engine's own path on a whole query scan, all labels, timed; the label slicing-axis first."""
        start, cpu_start = time.perf_counter(), cpu_seconds()
        seg = self.engine.segment(self.cases[query_id].image, labels=self.values)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
        prepared = self.engine.prepare(seg.volume)
        prediction, _ = slice_major(seg.label, seg.volume.affine, prepared.geometry.axis)
        stages = {k: float(v) for k, v in seg.timings.items() if k not in ("total", "slices", "reused")}
        return WholeScanRun(self.reference(query_id, prepared), prediction, len(prepared.canvas), len(seg.labels),
                            seconds, cpu, stages)

    def segment_and_score(self, fold: int, support_ids, query_id: str) -> CaseResult:
        """Whole-scan segmentation with the engine's retrieval, all labels, every slice scored."""
        run = self.segment_whole(query_id)
        n = run.slices
        # A label absent from both reference and prediction has no Dice (nan, left out of means);
        # a label predicted where the reference has none scores 0.
        return self._score(query_id, fold, support_ids, run.reference, {v: run.prediction == v for v in self.values},
                           self.values, None, math.nan, run.seconds, n, n * run.labels_segmented, run.stages, run.cpu,
                           display=run.prediction)

    def run_clinical(self, shots: int, n_splits: int = 1) -> tuple[list[CaseResult], list[dict]]:
        splits = [protocols.clinical_split(list(self.cases), shots, self.seed + i) for i in range(n_splits)]
        results, fold_info = [], []
        jobs = sum(len(self._queries(q)) for _, q in splits)
        with _progress(jobs, "clinical queries") as bar:
            for index, (support_ids, query_ids) in enumerate(splits):
                self.clear_bank()
                logger.info("split %d: support bank %s, queries %s", index, support_ids, query_ids)
                for sid in support_ids:
                    case = self.cases[sid]
                    self.engine.ingest(sid, case.image, case.label)
                per_label = self.engine.bank.stats()["per_label"]
                queries = self._queries(query_ids)
                for query_id in queries:
                    results.append(self.segment_and_score(index, support_ids, query_id))
                    bar.update(1)
                # Clinical supports are whole labelled scans: the table counts their labelled slices per organ.
                fold_info.append({"index": index, "seed": self.seed + index, "support_ids": list(support_ids),
                                  "query_ids": queries,
                                  "support_slices": {self.name_of[v]: int(per_label.get(str(v), 0))
                                                     for v in self.values}})
        return results, fold_info

    # -------------------------------------------------------------- growth curve

    def _put_cached(self, case_id: str, cache: dict, label_values: Sequence[int]) -> None:
        """Add a scan to the bank, computing its entries once per run (the orders re-add the same scans)."""
        if case_id not in cache:
            from fewshot.volume import label_to_canvas, read_label, read_volume

            case = self.cases[case_id]
            volume = read_volume(case.image)
            prepared = self.engine.prepare(volume)
            masks = label_to_canvas(read_label(case.label, volume), prepared.geometry)
            cache[case_id] = self.engine.support_batch(case_id, prepared, masks, label_values)
        case = self.cases[case_id]
        self.engine.bank.put(case_id, cache[case_id], {"image": case.image, "label": case.label})

    def run_growth(self, steps: Sequence[int] = protocols.GROWTH_STEPS, random_orders: int = RANDOM_SEEDS) -> dict:
        """Dice against labelled scans added in bank_coverage order, and in ``random_orders`` random orders."""
        ids = list(self.cases)
        first = protocols.growth_splits(ids, self.seed, steps)[0]
        all_queries = list(first.query_ids)
        queries = self._queries(all_queries)
        pool = sorted((i for i in ids if i not in set(all_queries)), key=protocols.scan_sort_key)
        usable = protocols.growth_steps(len(pool), steps)
        label_values = self.engine.label_values(self.values)
        batches: dict[str, object] = {}
        scored: dict[tuple[frozenset, str], float] = {}  # same bank, same query: same result
        logger.info("growth curve: pool %s, queries %s, steps %s", pool, queries, usable)

        embeddings: dict[str, np.ndarray] = {}

        def coverage_next(added: list[str]) -> str:
            from fewshot.coverage import propose

            remaining = [c for c in pool if c not in added]
            for c in remaining:
                if c not in embeddings:
                    embeddings[c] = self.engine.embed_volume(self.cases[c].image)
            return propose(self.engine.bank, {c: embeddings[c] for c in remaining}).image_id

        def fixed_next(order: list[str]) -> Callable[[list[str]], str]:
            return lambda added: order[len(added)]

        strategies: dict[str, list[tuple[int, Callable]]] = {"bank_coverage": [(self.seed, coverage_next)]}
        strategies["random"] = [
            (s, fixed_next([pool[i] for i in np.random.default_rng(s).permutation(len(pool))]))
            for s in range(self.seed, self.seed + random_orders)
        ]
        if not random_orders:
            del strategies["random"]
        out = {"scoring": "clinical: whole scans, all labels, every slice; Dice per query scan = mean over labels",
               "pool_ids": pool, "query_ids": queries, "steps": usable, "strategies": {}}
        rows = []
        total = sum(len(runs) for runs in strategies.values()) * len(usable) * len(queries)
        with _progress(total, "growth curve") as bar:
            for strategy, runs in strategies.items():
                points = {n: [] for n in usable}
                orders = []
                for seed, next_scan in runs:
                    self.clear_bank()
                    added: list[str] = []
                    per_step = {}
                    for n in usable:
                        while len(added) < n:
                            case_id = next_scan(added)
                            self._put_cached(case_id, batches, label_values)
                            added.append(case_id)
                        case_means = []
                        for q in queries:
                            key = (frozenset(added), q)
                            if key not in scored:
                                scored[key] = self.segment_and_score(-1, tuple(added), q).mean_dice()
                            case_means.append(scored[key])
                            rows.append({"strategy": strategy, "seed": seed, "n_labelled": n, "case_id": q,
                                         "dice": scored[key], "support_ids": " ".join(added)})
                            bar.update(1)
                        points[n].extend(case_means)
                        per_step[n] = float(np.nanmean(case_means)) if len(_finite(case_means)) else math.nan
                    orders.append({"seed": seed, "order": list(added), "dice_by_step": per_step})
                    logger.info("growth %s (seed %d): order %s, Dice %s", strategy, seed, added,
                                {n: round(d, 3) for n, d in per_step.items()})
                out["strategies"][strategy] = {
                    "runs": orders,
                    "points": [dict(zip(("n_labelled", "dice_mean", "dice_std", "n"), (n, *_stats(points[n]))))
                               for n in usable],
                }
        self.clear_bank()
        out["rows"] = rows
        return out


class _progress:
    """A tqdm bar over jobs (shown on terminals only); logging reports progress everywhere."""

    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="scan", disable=None)

    def __enter__(self):
        return self.bar

    def __exit__(self, *exc):
        self.bar.close()


# ------------------------------------------------------------------------------------ summary


HD95_EMPTY = {
    "exclude": "HD95 is undefined (null per case) when exactly one of prediction and reference is empty; "
               "such cases are left out of hd95_mean and counted in hd95_empty_prediction / hd95_empty_reference",
    "diagonal": "HD95 is undefined (null per case) when exactly one of prediction and reference is empty; "
                "hd95_mean counts such cases at the scan's diagonal in mm (the largest distance possible), "
                "so missing or inventing an organ is penalised, not dropped",
}


def hd95_undefined_because(r: CaseResult, value: int) -> str:
    """Why a case's HD95 is nan: '' when defined, else which side is empty."""
    if math.isfinite(r.scores[value].hd95):
        return ""
    if r.predicted_voxels[value] == 0 and r.reference_voxels[value] > 0:
        return "empty prediction"
    if r.reference_voxels[value] == 0 and r.predicted_voxels[value] > 0:
        return "empty reference"
    return "undefined"


def hd95_for_mean(r: CaseResult, value: int, policy: str) -> float:
    """The HD95 that enters hd95_mean under ``policy`` (nan = left out)."""
    h = r.scores[value].hd95
    if math.isfinite(h) or policy == "exclude":
        return h
    return r.diagonal_mm if hd95_undefined_because(r, value) in ("empty prediction", "empty reference") else h


def summarise(results: Sequence[CaseResult], name_of: Mapping[int, str], hd95_empty: str = "exclude") -> dict:
    if hd95_empty not in HD95_EMPTY:
        raise ValueError(f"unknown HD95 policy {hd95_empty!r}; use one of {', '.join(HD95_EMPTY)}")
    per_label = {}
    for value in sorted({v for r in results for v in r.scores}):
        mine = [r for r in results if value in r.scores]
        d_mean, d_std, d_n = _stats(r.scores[value].dice for r in mine)
        h_mean, h_std, h_n = _stats(hd95_for_mean(r, value, hd95_empty) for r in mine)
        why = [hd95_undefined_because(r, value) for r in mine]
        per_label[name_of.get(value, str(value))] = {
            "value": value, "dice_mean": d_mean, "dice_std": d_std, "n": d_n,
            "hd95_mean": h_mean, "hd95_std": h_std, "hd95_n": h_n,
            # Next to the mean, so that a label missed in many scans cannot look good on HD95.
            "hd95_empty_prediction": why.count("empty prediction"),
            "hd95_empty_reference": why.count("empty reference"),
        }
    label_means = [s["dice_mean"] for s in per_label.values()]
    hd_means = [s["hd95_mean"] for s in per_label.values()]
    return {
        "per_label": per_label,
        "mean_dice": float(np.mean(_finite(label_means))) if len(_finite(label_means)) else math.nan,
        "mean_hd95": float(np.mean(_finite(hd_means))) if len(_finite(hd_means)) else math.nan,
        "hd95_policy": {"name": hd95_empty, "what": HD95_EMPTY[hd95_empty]},
    }


def fold_summaries(results: Sequence[CaseResult], folds: list[dict], name_of: Mapping[int, str]) -> list[dict]:
    for info in folds:
        mine = [r for r in results if r.fold == info["index"]]
        info["per_label_dice"] = {
            name_of.get(v, str(v)): _stats(r.scores[v].dice for r in mine if v in r.scores)[0]
            for v in sorted({v for r in mine for v in r.scores})
        }
    return folds


def timing_summary(results: Sequence[CaseResult]) -> dict:
    """Three different clocks, named apart: wall time per query slice and per organ-slice, CPU time."""
    timed = [r for r in results if r.query_slices]
    wall_q = [r.seconds / r.query_slices for r in timed]
    wall_o = [r.seconds / r.organ_slices for r in timed if r.organ_slices]
    query_slices = sum(r.query_slices for r in timed)
    organ_slices = sum(r.organ_slices for r in timed)
    cpu = [r.cpu_seconds for r in timed if math.isfinite(r.cpu_seconds)]
    stages: dict[str, float] = {}
    for r in timed:
        for stage, sec in r.stage_seconds.items():
            stages[stage] = stages.get(stage, 0.0) + sec
    mean_std = lambda v: (float(np.mean(v)), float(np.std(v))) if v else (math.nan, math.nan)  # noqa: E731
    per_volume = [r.seconds for r in timed]
    return {
        "wall_seconds_per_volume": mean_std(per_volume)[0],
        "wall_seconds_per_volume_std": mean_std(per_volume)[1],
        "wall_seconds_per_volume_max": float(max(per_volume)) if per_volume else math.nan,
        "wall_seconds_per_query_slice": mean_std(wall_q)[0],
        "wall_seconds_per_query_slice_std": mean_std(wall_q)[1],
        "wall_seconds_per_organ_slice": mean_std(wall_o)[0],
        "cpu_seconds_per_query_slice": sum(cpu) / query_slices if cpu and query_slices and len(cpu) == len(timed)
        else math.nan,
        "stage_seconds_per_query_slice": {k: v / query_slices for k, v in stages.items()} if query_slices else {},
        "query_slices": query_slices,
        "organ_slices": organ_slices,
        "wall_seconds_total": float(sum(r.seconds for r in timed)),
        "what": {
            "wall_seconds_per_volume": "wall time segmenting one query scan (reading, preparing, all its labels); "
                                       "mean, std and max over scans",
            "wall_seconds_per_query_slice": "wall time segmenting a query scan (reading, preparing, all its labels) "
                                            "/ its distinct slices segmented; mean over scans",
            "wall_seconds_per_organ_slice": "the same wall time / (slice, organ) pairs segmented (alpnet runs each "
                                            "organ 1-way, so a slice holding 3 organs counts 3; clinical: slices x "
                                            "labels, all labels at once); mean over scans",
            "cpu_seconds_per_query_slice": "CPU time of the evaluating process and its worker processes over the "
                                           "same spans / query slices: above the wall figure when workers run in "
                                           "parallel",
            "stage_seconds_per_query_slice": "the engine's and transfer step's stage timers / query slices; the "
                                             "registration stages (register, fuse) sum the busy time of all "
                                             "workers (CPU-busy), the others are wall time in this process",
        },
    }


def case_rows(results: Sequence[CaseResult], name_of: Mapping[int, str], hd95_empty: str = "exclude") -> list[dict]:
    rows = []
    for r in results:
        for value, score in r.scores.items():
            rows.append({
                "fold": r.fold, "case_id": r.case_id, "support_ids": " ".join(r.support_ids),
                "label": value, "label_name": name_of.get(value, str(value)),
                "dice": score.dice, "hd95": score.hd95,
                "hd95_undefined_because": hd95_undefined_because(r, value),
                "hd95_in_mean": hd95_for_mean(r, value, hd95_empty),
                "scored_slices": r.scored_slices[value],
                "reference_voxels": r.reference_voxels[value], "predicted_voxels": r.predicted_voxels[value],
                "seconds": round(r.seconds, 3),
            })
    return rows


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["case_id"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    return path


def montage_cases(results: Sequence[CaseResult], count: int = MONTAGE_CASES) -> list[tuple[str, CaseResult]]:
    """The ``count`` best and worst cases by mean Dice over labels (each case shown once)."""
    ranked = sorted((r for r in results if r.preview is not None and math.isfinite(r.mean_dice())),
                    key=lambda r: r.mean_dice(), reverse=True)
    count = min(count, max(1, len(ranked) // 2))
    best = ranked[:count]
    shown = {id(r) for r in best}  # identity: results hold arrays, so == is not usable
    worst = [r for r in ranked[::-1][:count] if id(r) not in shown]
    return [("best", r) for r in best] + [("worst", r) for r in worst[::-1]]


def write_plots(out: Path, results: Sequence[CaseResult], rows: list[dict], growth: dict | None,
                name_of: Mapping[int, str], title: str) -> dict[str, Path]:
    from fewshot.eval import plots

    files = {}
    if rows:
        files["boxplot"] = plots.box_plot_per_label(rows, out / "dice_per_label.png", title=f"{title}: per-case scores",
                                                    label_names=dict(name_of))
    chosen = montage_cases(results)
    if chosen:
        panels = [(f"{kind}: {r.case_id} (fold {r.fold})\nmean Dice {r.mean_dice():.3f}, slice {r.preview.slice_index}",
                   r.preview.image, r.preview.truth, r.preview.prediction) for kind, r in chosen]
        files["montage"] = plots.overlay_montage(panels, out / "overlays_best_worst.png",
                                                 title=f"{title}: best and worst cases", label_names=dict(name_of))
    if growth and growth["steps"]:
        curves = {}
        for strategy, data in growth["strategies"].items():
            label = f"{strategy} (mean of {len(data['runs'])} seeds)" if len(data["runs"]) > 1 else strategy
            curves[label] = [(p["n_labelled"], p["dice_mean"], p["dice_std"]) for p in data["points"]
                             if p["dice_mean"] is not None and math.isfinite(p["dice_mean"])]
        files["growth"] = plots.growth_curve(curves, out / "growth_curve.png",
                                             title=f"{title}: Dice as labelled scans are added")
    return files


# ------------------------------------------------------------------------------------ fold table


def fold_table(folds: Sequence[Mapping], protocol: str) -> list[dict]:
    """One row per fold: support scan(s), query scans, support slices per organ (alpnet: the slice
    indices, canvas z; clinical: the count of labelled slices in the bank)."""
    rows = []
    for f in folds:
        slices = f.get("support_slices", {})
        text = "; ".join(f"{name}: {' '.join(map(str, zs)) if isinstance(zs, list) else zs}"
                         for name, zs in slices.items())
        rows.append({"fold": f["index"], "support_ids": " ".join(f["support_ids"]),
                     "query_ids": " ".join(f["query_ids"]),
                     ("support_slices" if protocol == "alpnet" else "support_labelled_slices"): text})
    return rows


def write_fold_table(out: Path, rows: list[dict], protocol: str) -> tuple[Path, Path]:
    csv_path = _write_csv(out / "folds.csv", rows)
    header = list(rows[0]) if rows else ["fold"]
    what = ("support slices: canvas slice indices per organ, one per chunk (SSL-ALPNet's get_support)"
            if protocol == "alpnet" else "support_labelled_slices: slices per organ labelled in the support bank")
    lines = [f"# Folds ({protocol})", "", what, "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[k]) for k in header) + " |" for r in rows]
    md_path = out / "folds.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


# ------------------------------------------------------------------------------------ nested selection

SELECTION_GROUPS = 5  # clinical: query scans are split into this many groups for nested selection


def _top_level_split(text: str) -> list[str]:
    """'1,[0.25,0.5,0.25],[1]' -> ['1', '[0.25,0.5,0.25]', '[1]']: commas inside brackets stay."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def parse_select(items: Sequence[str] | None) -> dict[str, list]:
    """['embedder.pca_dims=16,32,64', ...] -> {'embedder.pca_dims': [16, 32, 64], ...} (YAML values;
    a list value is written in brackets: 'transfer.consistency.z_weights=[1],[0.25,0.5,0.25]')."""
    from fewshot.config import parse_value

    grid: dict[str, list] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--select {item!r} must look like KEY=V1,V2,...")
        key, values = (t.strip() for t in item.split("=", 1))
        parsed = [parse_value(v.strip()) for v in _top_level_split(values) if v.strip()]
        if not key or not parsed:
            raise ConfigError(f"--select {item!r} names no key or no values")
        if key in grid:
            raise ConfigError(f"--select names {key!r} twice")
        if len(set(map(repr, parsed))) != len(parsed):
            raise ConfigError(f"--select {key!r} repeats a value")
        grid[key] = parsed
    return grid


def grid_points(grid: Mapping[str, Sequence]) -> list[dict]:
    """Every combination of the grid's values, in a fixed order (the first key varies slowest)."""
    import itertools

    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))] if keys else [{}]


def selection_score(rows: Sequence[tuple[str, int, float]]) -> float:
    """(case, label, dice) rows -> mean over labels of the per-label mean over cases: the headline's rule."""
    by_label: dict[int, list[float]] = {}
    for _, label, d in rows:
        if math.isfinite(d):
            by_label.setdefault(label, []).append(d)
    means = [float(np.mean(v)) for v in by_label.values() if v]
    return float(np.mean(means)) if means else math.nan


def nested_select(rows: Sequence[tuple[int, int, str, int, float]]) -> dict[int, dict]:
    """Nested selection over (point, group, case, label, dice) rows.

    For each group, the grid point with the best ``selection_score`` on the OTHER groups' rows is
    chosen (ties: the earlier point), and the group is reported at that point, so no group's own
    scores ever influence the setting it is scored with. -> group -> {"point", "score_other_groups",
    "score_this_group"}.
    """
    points = sorted({r[0] for r in rows})
    groups = sorted({r[1] for r in rows})
    if len(groups) < 2:
        raise ValueError("nested selection needs at least two groups of query scans")
    out = {}
    for g in groups:
        best, best_score = None, -math.inf
        for p in points:
            score = selection_score([(c, lb, d) for pp, gg, c, lb, d in rows if pp == p and gg != g])
            if math.isfinite(score) and score > best_score:
                best, best_score = p, score
        if best is None:
            raise ValueError(f"group {g}: no grid point has a finite Dice on the other groups")
        own = selection_score([(c, lb, d) for pp, gg, c, lb, d in rows if pp == best and gg == g])
        out[g] = {"point": best, "score_other_groups": best_score, "score_this_group": own}
    return out


def selection_groups(results: Sequence[CaseResult], protocol: str) -> dict[tuple[int, str], int]:
    """(fold, case id) -> selection group: alpnet, its CV fold; clinical, the query scans sorted by id
    and dealt round-robin into ``SELECTION_GROUPS`` groups (a scan is in one group in every split)."""
    if protocol == "alpnet":
        return {(r.fold, r.case_id): r.fold for r in results}
    ids = sorted({r.case_id for r in results}, key=protocols.scan_sort_key)
    n = min(SELECTION_GROUPS, len(ids))
    rank = {cid: i % n for i, cid in enumerate(ids)}
    return {(r.fold, r.case_id): rank[r.case_id] for r in results}


# ------------------------------------------------------------------------------------ entry point

ALPNET_SUPPORTS = {
    "slices": "the protocol: one support slice per chunk of each organ's extent in the support scan",
    "volume": "NOT the protocol: the support scan's whole labelled volume is the bank (multi-atlas methods "
              "need it); same folds, same scoring, reported as its own row",
}

ALPNET_SETTINGS_NOTE = (
    "SSL-ALPNet's setting 1 and setting 2 differ only in the slices a model may be trained on (setting 2 "
    "removes every training slice holding a test organ). This engine is not trained on these scans, so for "
    "it the two settings coincide: its figures compare with either column."
)


def _protocol_run(settings: Mapping, cases, label_map, protocol: str, *, models_dir, max_queries, seed, n_folds,
                  chunks, fold_convention, shots, growth: bool, growth_steps, alpnet_support: str = "slices",
                  growth_random: int = RANDOM_SEEDS) -> tuple:
    """One engine, one full protocol run -> (results, fold_info, growth or None, engine settings)."""
    from fewshot.pipeline import Engine

    engine, _ = Engine.from_settings(settings, bank_dir=None, models_dir=models_dir, label_names=label_map)
    try:
        run = EvalRun(engine, cases, label_map, max_queries=max_queries, seed=seed)
        if protocol == "alpnet":
            results, fold_info = run.run_alpnet(n_folds, chunks, fold_convention, alpnet_support)
        else:
            results, fold_info = run.run_clinical(shots, n_folds)
        growth_out = run.run_growth(growth_steps, growth_random) if growth else None
    finally:
        close = getattr(engine.transfer, "close", None)  # e.g. the registration worker pool
        if close:
            close()
    return results, fold_info, growth_out, engine.settings


def run_eval(
    data_dir: str | Path,
    protocol: str,
    preset: str,
    out_dir: str | Path,
    *,
    labels: str | Mapping[str, int] | None = None,
    folds: int | None = None,
    shots: int = 1,
    growth: bool = False,
    growth_steps: Sequence[int] = protocols.GROWTH_STEPS,
    models_dir: str | Path | None = None,
    overrides: Mapping | Sequence[str] | None = None,
    max_queries: int | None = None,
    dataset: str | None = None,
    seed: int = 0,
    device: str | None = None,
    chunks: int = 3,
    fold_convention: str = "alpnet",
    select: Mapping[str, Sequence] | Sequence[str] | None = None,
    hd95_empty: str = "exclude",
    alpnet_support: str = "slices",
    growth_random: int = RANDOM_SEEDS,
) -> EvalReport:
    """Evaluate ``preset`` on the ``image_N``/``label_N`` pairs of ``data_dir``; write OUT/metrics.json,
    OUT/cases.csv, OUT/folds.{csv,md} and PNG plots. ``folds``: alpnet folds (default 5) or clinical
    random splits (default 1). ``select``: a grid of preset overrides chosen by nested cross-validation."""
    from fewshot.config import load_preset
    from fewshot.datastore import scan_pairs

    started = time.perf_counter()
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    if max_queries is not None and max_queries < 1:
        raise ValueError("--max-queries must be at least 1")
    if growth_random < 0:
        raise ValueError("--growth-random must be 0 or more")
    if alpnet_support not in ALPNET_SUPPORTS:
        raise ValueError(f"unknown --alpnet-support {alpnet_support!r}; use one of {', '.join(ALPNET_SUPPORTS)}")
    if hd95_empty not in HD95_EMPTY:
        raise ValueError(f"unknown --hd95-empty {hd95_empty!r}; use one of {', '.join(HD95_EMPTY)}")
    grid = dict(select) if isinstance(select, Mapping) else parse_select(select)
    if grid and growth:
        raise ValueError("--select and --growth cannot be combined: run the growth curve separately")
    pairs = scan_pairs(data_dir)
    if len(pairs) < 2:
        raise ValueError(f"{data_dir}: found {len(pairs)} image_N/label_N pairs; evaluation needs at least 2")
    cases = [Case(cid, img, lab) for cid, (img, lab) in pairs.items()]

    ds = dataset_for(data_dir, dataset)
    merged = dict(ds.overrides()) if ds else {}
    merged.update(parse_overrides(list(overrides)) if isinstance(overrides, (list, tuple)) else dict(overrides or {}))
    if device:
        merged["device"] = device
    points = grid_points(grid)
    settings = [load_preset(preset, {**merged, **point}) for point in points]  # every point checked up front

    label_map = parse_label_map(labels) or (dict(ds.labels) if ds else {})
    if not label_map:
        label_map = {str(v): v for v in label_values_in(cases)}
        logger.info("no label names given: evaluating every value found in the labels, %s", sorted(label_map.values()))
    if not label_map:
        raise ValueError(f"{data_dir}: the labels hold no foreground values")

    # Splits are checked before the networks load, so an impossible request fails at once.
    n_folds = (5 if protocol == "alpnet" else 1) if folds is None else folds
    if protocol == "alpnet":
        protocols.alpnet_folds([c.case_id for c in cases], n_folds, fold_convention)
        if grid and n_folds < 2:
            raise ValueError("--select needs at least 2 folds (it selects on the other folds)")
    else:
        _, query_ids = protocols.clinical_split([c.case_id for c in cases], shots, seed)
        if grid and len(query_ids) < 2:
            raise ValueError("--select needs at least 2 query scans (it selects on the other scans)")
    if growth:
        protocols.growth_splits([c.case_id for c in cases], seed, growth_steps)
    name_of = {v: n for n, v in label_map.items()}

    runs = []
    for i, (point, point_settings) in enumerate(zip(points, settings)):
        if grid:
            logger.info("grid point %d/%d: %s", i + 1, len(points), point)
        runs.append(_protocol_run(point_settings, cases, label_map, protocol, models_dir=models_dir,
                                  max_queries=max_queries, seed=seed, n_folds=n_folds, chunks=chunks,
                                  fold_convention=fold_convention, shots=shots, growth=growth,
                                  growth_steps=growth_steps, alpnet_support=alpnet_support,
                                  growth_random=growth_random))
    results, fold_info, growth_out, engine_settings = runs[0]
    selection = None
    if grid:
        results, selection = _nested_results(runs, points, grid, protocol, name_of)
        engine_settings = load_preset(preset, merged)  # the preset before the grid's overrides

    if protocol == "alpnet":
        protocol_info = {"folds": n_folds, "chunks": chunks, "fold_convention": fold_convention,
                         "support": alpnet_support, "support_note": ALPNET_SUPPORTS[alpnet_support],
                         "fold_source": (ds.folds if ds and ds.folds else
                                         "SSL-ALPNet's rule over the numerically sorted scans (protocols.alpnet_folds)"),
                         "settings_1_and_2": ALPNET_SETTINGS_NOTE,
                         "scored": "each organ on the slices of its reference z-extent, 1-way (its own binary "
                                   "prediction), Dice per scan"}
    else:
        protocol_info = {"shots": shots, "splits": n_folds, "seed": seed,
                         "scored": "whole scans, all labels, every slice; Dice undefined (null) when a label is "
                                   "absent from both reference and prediction"}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = case_rows(results, name_of, hd95_empty)
    if selection is not None:
        chosen = {(r.fold, r.case_id): selection["_point_of"][(r.fold, r.case_id)] for r in results}
        for row in rows:
            row["selected_point"] = chosen[(row["fold"], row["case_id"])]
    files = {"cases": _write_csv(out / "cases.csv", rows)}
    if selection is not None:
        grid_rows = []
        for index, (point_results, *_rest) in enumerate(runs):
            for row in case_rows(point_results, name_of, hd95_empty):
                grid_rows.append({"point": index, **row})
        files["grid_cases"] = _write_csv(out / "cases_grid.csv", grid_rows)
        selection.pop("_point_of")
    table = fold_table(fold_info, protocol)
    files["folds_csv"], files["folds_md"] = write_fold_table(out, table, protocol)
    for row in table:
        logger.info("fold %s: support %s | queries %s | %s", row["fold"], row["support_ids"], row["query_ids"],
                    row.get("support_slices", row.get("support_labelled_slices")))
    if growth_out is not None:
        files["growth_cases"] = _write_csv(out / "growth.csv", growth_out.pop("rows"))
    title = f"{Path(data_dir).name}, {preset}, {protocol}" + (" (nested selection)" if grid else "")
    files.update(write_plots(out, results, rows, growth_out, name_of, title))

    metrics = {
        "protocol": protocol,
        "preset": preset,
        "data": str(Path(data_dir).resolve()),
        "dataset": asdict(ds) if ds else None,
        "labels": label_map,
        **summarise(results, name_of, hd95_empty),
        "protocol_settings": protocol_info,
        "folds": fold_summaries(results, fold_info, name_of),
        "n_cases": len(results),
        "selection": selection,
        "timing": timing_summary([r for run in runs for r in run[0]]),
        "growth": growth_out,
        "settings": engine_settings,
        "max_queries": max_queries,
        "elapsed_seconds": time.perf_counter() - started,
        "files": {k: p.name for k, p in files.items()},
    }
    files["metrics"] = out / "metrics.json"
    metrics["files"]["metrics"] = "metrics.json"
    files["metrics"].write_text(json.dumps(json_safe(metrics), indent=1, default=str))
    logger.info("%s on %s with %s: mean Dice %.3f over %d labels%s; wrote %s", protocol, Path(data_dir).name, preset,
                metrics["mean_dice"], len(metrics["per_label"]), " (nested selection)" if grid else "", out)
    return EvalReport(metrics=metrics, out_dir=out, files=files)


def _nested_results(runs, points: list[dict], grid: Mapping, protocol: str, name_of) -> tuple[list[CaseResult], dict]:
    """Each group's results at the grid point chosen on the other groups, and what metrics.json records."""
    all_results = [r for run in runs for r in run[0]]
    group_of = selection_groups(all_results, protocol)
    rows = [(p, group_of[(r.fold, r.case_id)], f"{r.fold}/{r.case_id}", v, s.dice)
            for p, run in enumerate(runs) for r in run[0] for v, s in r.scores.items()]
    choice = nested_select(rows)
    nested, point_of, per_group = [], {}, []
    for g, c in sorted(choice.items()):
        mine = [r for r in runs[c["point"]][0] if group_of[(r.fold, r.case_id)] == g]
        nested.extend(mine)
        point_of.update({(r.fold, r.case_id): c["point"] for r in mine})
        per_group.append({"group": g, "case_ids": sorted({r.case_id for r in mine}, key=protocols.scan_sort_key),
                          "chosen_point": c["point"], "chosen": points[c["point"]],
                          "mean_dice_other_groups": c["score_other_groups"],
                          "mean_dice_this_group": c["score_this_group"]})
        logger.info("selection group %d: chose %s (mean Dice %.3f on the other groups, %.3f here)", g,
                    points[c["point"]], c["score_other_groups"], c["score_this_group"])
    nested.sort(key=lambda r: (r.fold, protocols.scan_sort_key(r.case_id)))
    point_means = []
    for p, run in enumerate(runs):
        summary = summarise(run[0], name_of)
        point_means.append({"point": p, "overrides": points[p], "mean_dice": summary["mean_dice"],
                            "per_label_dice": {k: v["dice_mean"] for k, v in summary["per_label"].items()}})
    selection = {
        "grid": dict(grid),
        "groups": ("the protocol's cross-validation folds" if protocol == "alpnet" else
                   f"query scans sorted by id, dealt round-robin into {SELECTION_GROUPS} groups"),
        "rule": "for each group, the point with the best mean Dice (mean over labels of the mean over scans) on "
                "the OTHER groups' query scans; the group is reported at that point (ties: the earlier point)",
        "headline": "per_label, mean_dice and cases.csv are the nested figures",
        "per_group": per_group,
        "points": point_means,
        "points_note": "each point's mean over ALL groups: picking the best of these would tune on the scored "
                       "scans, so they are shown for inspection only, never as a result",
        "_point_of": point_of,
    }
    return nested, selection
