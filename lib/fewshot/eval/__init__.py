"""Evaluation (``python -m fewshot eval``), one room per concern:

* ``metrics``: Dice, HD95 and surface distances; ``protocols``: the literature's rules as data (folds,
  splits, chunks);
* ``plan`` (``EvalPlan``: what is asked), ``datasets`` (dataset files, scans, references), ``run``
  (the engine, scans and scoring every protocol shares);
* ``alpnet`` and ``clinical``, the protocols as objects, and ``growth``, the learning curve;
* ``selection`` (nested selection for ``--select``), ``results`` (summaries) and ``report`` (files);
* ``runner``: ``run_eval``/``evaluate``, from plan to files.

Figures come from ``fewshot.plots`` (shared with the benchmark), imported on demand so that scoring
does not load matplotlib.
"""
from .metrics import CaseLabelScore, LabelScore, dice, hd95
from .protocols import (
    GROWTH_STEPS,
    Fold,
    GrowthSplit,
    alpnet_folds,
    clinical_split,
    growth_splits,
    growth_steps,
    label_presence,
    organ_chunks,
    organ_extent,
    query_chunk_assignment,
    support_slice_per_chunk,
)

__all__ = [
    "CaseLabelScore", "LabelScore", "dice", "hd95",
    "GROWTH_STEPS", "Fold", "GrowthSplit", "alpnet_folds", "clinical_split", "growth_splits", "growth_steps",
    "label_presence", "organ_chunks", "organ_extent", "query_chunk_assignment", "support_slice_per_chunk",
]
