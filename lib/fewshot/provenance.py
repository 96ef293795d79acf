"""Where each label of a segmentation came from, as the sidecar and the app's /infer answer say it:
per label and slice, the supports used (their scan, the file's own slice number along its own axis,
similarity, match distance) with the object score and whether the label was kept; for a scan-level
(multi-atlas) transfer, the atlases registered for each label. Read-only over the bank's records.
"""
from __future__ import annotations

from typing import Mapping

from fewshot.bank import SupportBank
from fewshot.decision import LabelDecision
from fewshot.volume import CanvasGeometry


def slice_provenance(bank: SupportBank, plans, result, chosen: Mapping[str, int], geometry: CanvasGeometry,
                     decision: LabelDecision = LabelDecision()) -> dict:
    """label name -> {"slice_axis", "slices": {slice: {"supports": [...], "object_score", "present"}}}.

    Slice numbers are the files' own: the query's along its array axis ``slice_axis``, each
    support's along the axis named by its ``axis`` (both 0-based, as in nibabel/numpy).
    """
    axes: dict[str, int | None] = {}

    def support_entry(s, value):
        if s.ref.image_id not in axes:
            axes[s.ref.image_id] = bank.record(s.ref.image_id)["source"].get("slice_axis") if s.ref.image_id in bank else None
        entry = dict(s.ref.as_dict(), axis=axes[s.ref.image_id], similarity=round(s.score, 4), has_label=value in s.labels)
        if s.match_distance is not None:
            entry["match_distance"] = round(s.match_distance, 4)
        return entry

    out = {}
    decided = [decision.decide(sres.probabilities) for sres in result.slices]
    for name, value in chosen.items():
        c = list(result.labels).index(value)
        per_slice = {}
        for plan, sres, picked in zip(plans, result.slices, decided):
            ran = plan.labels if sres.ran is None else sres.ran
            if value not in ran:
                continue
            per_slice[str(geometry.file_slice(plan.slice_index))] = {
                "supports": [support_entry(s, value) for s in plan.supports],
                # "neighbour": no chosen support holds the label; it ran because the slice
                # before it in the propagation predicted it present.
                "via": "supports" if value in plan.labels else "neighbour",
                "object_score": round(float(sres.object_scores[c]), 3),
                "present": bool((picked == c).any()),
            }
        out[name] = {"slice_axis": geometry.file_axis, "slices": dict(sorted(per_slice.items(), key=lambda kv: int(kv[0])))}
    return out

def atlas_provenance(bank: SupportBank, result, chosen: Mapping[str, int], geometry: CanvasGeometry,
                     decision: LabelDecision) -> dict:
    """label name -> {"atlases": the scans registered for it (similarity, time), "slice_axis",
    "slices": {file slice: {"object_score", "present"}} where the label was predicted}."""
    out = {}
    has = {a: set(bank.record(a)["labels"]) if a in bank else set() for a in (u.image_id for u in result.atlases)}
    decided = [decision.decide(sres.probabilities) for sres in result.slices]
    for name, value in chosen.items():
        c = list(result.labels).index(value)
        per_slice = {}
        for z, (sres, picked) in enumerate(zip(result.slices, decided)):
            peak = float(sres.probabilities[c].max()) if sres.probabilities.size else 0.0
            if peak > 0:
                per_slice[str(geometry.file_slice(z))] = {"object_score": round(float(sres.object_scores[c]), 3),
                                                          "present": bool((picked == c).any())}
        out[name] = {
            "atlases": [u.as_dict() for u in result.atlases if value in has.get(u.image_id, set())],
            "slice_axis": geometry.file_axis,
            "slices": dict(sorted(per_slice.items(), key=lambda kv: int(kv[0]))),
        }
    return out


