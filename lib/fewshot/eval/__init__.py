"""Evaluation: scores (``metrics``), the literature's protocols as data (``protocols``), figures (``plots``).

``plots`` is imported on demand (``from fewshot.eval import plots``) so that scoring does not load
matplotlib.
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
