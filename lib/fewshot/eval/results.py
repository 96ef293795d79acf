"""What eval measures and how it is summed up: one scored query scan (``CaseResult``), the per-label
means with the HD95 policy beside them, the timing summary, and the rows of cases.csv."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from fewshot.eval.datasets import Reference
from fewshot.eval.metrics import LabelScore


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


def finite(values) -> np.ndarray:
    arr = np.asarray([float(v) for v in values], dtype=float)
    return arr[np.isfinite(arr)]


def stats(values) -> tuple[float, float, int]:
    arr = finite(values)
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
        d_mean, d_std, d_n = stats(r.scores[value].dice for r in mine)
        h_mean, h_std, h_n = stats(hd95_for_mean(r, value, hd95_empty) for r in mine)
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
        "mean_dice": float(np.mean(finite(label_means))) if len(finite(label_means)) else math.nan,
        "mean_hd95": float(np.mean(finite(hd_means))) if len(finite(hd_means)) else math.nan,
        "hd95_policy": {"name": hd95_empty, "what": HD95_EMPTY[hd95_empty]},
    }


def fold_summaries(results: Sequence[CaseResult], folds: list[dict], name_of: Mapping[int, str]) -> list[dict]:
    for info in folds:
        mine = [r for r in results if r.fold == info["index"]]
        info["per_label_dice"] = {
            name_of.get(v, str(v)): stats(r.scores[v].dice for r in mine if v in r.scores)[0]
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
