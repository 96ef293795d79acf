"""One evaluation's shared setup, whatever the protocol: the engine, the dataset's scans and label
map, a scan's reference, the engine's own whole-scan path, and scoring a prediction."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from fewshot.eval.datasets import Case, Reference, slice_major
from fewshot.eval.metrics import LabelScore, dice, hd95
from fewshot.eval.results import CaseResult, combined_map, make_preview
from fewshot.meters import cpu_seconds

logger = logging.getLogger(__name__)


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
    """One evaluation: an engine, the dataset's scans and label map; protocols (``alpnet``,
    ``clinical``, ``growth``) drive it and score through it."""

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

    def queries(self, ids: Sequence[str]) -> list[str]:
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

    def score(self, case_id: str, fold: int, support_ids, ref: Reference, predictions: Mapping[int, np.ndarray],
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
        return self.score(query_id, fold, support_ids, run.reference, {v: run.prediction == v for v in self.values},
                           self.values, None, math.nan, run.seconds, n, n * run.labels_segmented, run.stages, run.cpu,
                           display=run.prediction)


class progress:
    """A tqdm bar over jobs (shown on terminals only); logging reports progress everywhere."""

    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="scan", disable=None)

    def __enter__(self):
        return self.bar

    def __exit__(self, *exc):
        self.bar.close()
